"""An installed wheel is one `fedlens` namespace: it drops no generic top-level module
(`shared`, `client`, `server`, `simulations`, `ops`) into a user's environment, and the
`fedlens` command runs a simulation from it, outside the source tree."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fedlens.ops.procs import flower_env

REPO = Path(__file__).resolve().parents[1]
GENERIC = ("shared", "client", "server", "simulations", "ops")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = tmp_path_factory.mktemp("source") / "fedlens"
    skip = shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".*_cache", "test-artifacts")
    shutil.copytree(REPO, source, ignore=skip)
    # No build isolation: the build must not need the network (setuptools is in the environment).
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.glob("fedlens-*.whl")
    return path


def test_wheel_holds_only_the_fedlens_namespace(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"fedlens"}, tops
    for package in ("shared", "client", "server", "simulations", "ops"):
        assert f"fedlens/{package}/__init__.py" in names
    assert "fedlens/simulations/experiments/smoke.toml" in names
    assert not any(n.startswith(("fedlens/tests", "fedlens/benchmarks")) for n in names)


@pytest.mark.slow
def test_installed_wheel_runs_beside_an_unrelated_client_package(wheel: Path, tmp_path: Path, cache_dir: str):
    """A fresh venv gets the wheel and a package named `client`; both import, and a smoke run works."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    # The wheel first, with nothing else visible: pip must not take this environment's
    # editable fedlens for an installed one.
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--ignore-installed", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    # The pinned stack (torch, Flower, ...) comes from this environment, as plain paths: its
    # editable fedlens hook is not processed there, so fedlens can only come from the wheel.
    (purelib / "stack.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    (purelib / "client").mkdir()
    (purelib / "client" / "__init__.py").write_text('NAME = "unrelated client package"\n')
    # A clean environment: an earlier simulation in this process (Flower's Ray backend) put the
    # checkout on PYTHONPATH, where `import client` would find the repository's folder.
    env = {k: v for k, v in flower_env().items() if k != "PYTHONPATH"}
    probe = "import client, fedlens.client.app, fedlens.shared; print(client.NAME); print(fedlens.shared.__file__)"
    out = subprocess.run([str(python), "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    name, location = out.stdout.strip().splitlines()[-2:]
    assert name == "unrelated client package"
    assert Path(location).is_relative_to(purelib), f"fedlens imported from {location}, not from the wheel"

    run = subprocess.run(
        [
            str(venv / "bin" / "fedlens"),
            "simulate",
            "--experiment",
            "smoke",
            "--set",
            f"cache-dir={cache_dir!r}",
            "--set",
            "report-per-class=0",
            "--out",
            str(tmp_path / "run"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "final accuracy" in run.stdout and (tmp_path / "run" / "summary.json").is_file()
