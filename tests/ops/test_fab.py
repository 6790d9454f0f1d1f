"""The app `fedlens run` submits, and the repository's own `flwr run .` app, agree."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from fedlens.ops.fab import CLIENT_APP, SERVER_APP, app_pyproject, write_app
from fedlens.ops.procs import flower_bin, flower_env
from fedlens.shared.config import APP_KEYS, FedConfig

ROOT = Path(__file__).resolve().parents[2]


def test_generated_config_table_is_every_key_with_its_default():
    app = tomllib.loads(app_pyproject())["tool"]["flwr"]["app"]
    config = app["config"]
    assert {k: v for k, v in config.items() if k not in APP_KEYS} == FedConfig().to_dict()
    assert FedConfig.from_run_config(config) == FedConfig()
    assert app["components"] == {"serverapp": SERVER_APP, "clientapp": CLIENT_APP}


def test_repository_app_equals_the_generated_app():
    repo = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["flwr"]["app"]
    generated = tomllib.loads(app_pyproject())["tool"]["flwr"]["app"]
    assert repo["components"] == generated["components"]
    assert repo["config"] == generated["config"], "pyproject.toml [tool.flwr.app.config] is out of date with FedConfig"


def test_flower_builds_the_generated_app_with_no_code_in_it(tmp_path):
    folder = write_app(tmp_path / "app")
    proc = subprocess.run(
        [flower_bin("flwr"), "build"],
        cwd=folder,
        env=flower_env(FLWR_HOME=str(tmp_path / "home")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (fab,) = folder.glob("*.fab")
    names = zipfile.ZipFile(fab).namelist()
    assert "pyproject.toml" in names and not [n for n in names if n.endswith(".py")]


def test_the_apps_load_from_the_installed_package_outside_the_repository(tmp_path):
    code = "from flwr.supercore.object_ref import load_app; load_app(%r, ValueError, %r); load_app(%r, ValueError, %r); print('ok')"
    proc = subprocess.run(
        [sys.executable, "-c", code % (SERVER_APP, str(tmp_path), CLIENT_APP, str(tmp_path))],
        cwd=tmp_path,
        env=flower_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
