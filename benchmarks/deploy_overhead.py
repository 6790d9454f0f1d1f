"""Per-round wall time: a real deployment (server + sites as processes, TLS + auth) vs simulation.

Same tiny work in both: 2 sites x 60 images of 32 px (3 classes), the default model
and DP-SGD, `--rounds` rounds. The deployment runs `fedlens server start` (SuperLink
behind the front door), two `fedlens client start` (each serving its SuperNode's tasks
in its own long-lived process) and `fedlens run` on loopback; the simulation runs
`fedlens simulate` on the same images. For reference it also times what a fresh
process needs to import the ClientApp and load the site: what Flower's own executor
paid on every message, and what a fedlens site now pays once.

    python benchmarks/deploy_overhead.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _deploy import start_server, start_site, stop_children_on_sigterm

from fedlens.ops.certs import add_site, init_ca
from fedlens.ops.procs import Procs, flower_env
from fedlens.shared.config import FedConfig
from fedlens.shared.data.samples import SAMPLE_CLASSES, write_sample_folders

SITES = ["site-a", "site-b"]


def _round_times(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in records]
    return [b - a for a, b in zip(elapsed, elapsed[1:])]


def _per_message_startup(env: dict[str, str], site_dir: Path, cache: str) -> float:
    """Seconds a fresh process needs to import the ClientApp and load a deployed site."""
    code = (
        "import time; t=time.perf_counter(); import fedlens.client.app; from fedlens.client.site import load_site; "
        "from fedlens.shared.config import FedConfig; "
        f"cfg=FedConfig.from_mapping({{'image-size': 32, 'batch-size': 16, 'cache-dir': {cache!r}}}); "
        f"load_site(cfg, {{'data-path': {str(site_dir)!r}, 'site-name': 'site-a'}}, classes={sorted(SAMPLE_CLASSES)!r}); "
        "print(time.perf_counter()-t)"
    )
    runs = [
        float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()[-1])
        for _ in range(3)
    ]
    return sorted(runs)[1]


def _deploy(root: Path, env: dict[str, str], certs: Path, data: dict[str, Path], base: dict[str, object]) -> tuple[list[float], float]:
    """Server + sites + `fedlens run`; returns per-round times and the run's wall time."""
    procs = Procs(root / "logs", env)
    try:
        state = root / "server"
        _server, port = start_server(procs, certs, state)
        for site in SITES:
            start_site(procs, env, name=site, certs=certs, state=state, port=port, data=data[site], site_state=root / "state" / site)
        time.sleep(10)
        cfg_file = root / "deploy.toml"
        cfg_file.write_text(FedConfig.from_mapping({**base, "data-path": str(data["server"]), "test-fraction": 0.5}).to_toml())
        started = time.monotonic()
        run = procs.start(
            "run",
            "run",
            "--state-dir",
            str(state),
            "--config",
            str(cfg_file),
            "--out",
            str(root / "run"),
        )
        if run.wait(timeout=1800) != 0:
            raise SystemExit(procs.log("run")[-3000:])
        return _round_times(root / "run"), time.monotonic() - started
    finally:
        procs.stop_all()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    stop_children_on_sigterm()
    root = Path(tempfile.mkdtemp(prefix="fedlens-deploy-bench-"))
    env = flower_env(FLWR_HOME=str(root / "flwr-home"))
    data = write_sample_folders(root / "images", ["server", *SITES])
    pooled = root / "pooled"  # the same images in one folder, for the simulation
    for name in ("server", *SITES):
        shutil.copytree(data[name], pooled, dirs_exist_ok=True)
    cache = str(root / "cache")
    base = {
        "dataset": "folder",
        "image-size": 32,
        "batch-size": 16,
        "num-rounds": args.rounds,
        "num-sites": 2,
        "min-sites": 2,
        "cache-dir": cache,
        "target-epsilon": 8.0,
    }
    certs = root / "certs"
    init_ca(certs, ["127.0.0.1"])
    for site in SITES:
        add_site(certs, site)
    deploy, deploy_wall = _deploy(root / "deploy", env, certs, data, base)
    sim_file = root / "sim.toml"
    sim_file.write_text(FedConfig.from_mapping({**base, "data-path": str(pooled), "test-fraction": 1 / 3, "partition": "iid"}).to_toml())
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "fedlens.ops.cli", "simulate", "--config", str(sim_file), "--out", str(root / "sim-run")],
        env=env,
        check=True,
        capture_output=True,
    )
    sim_wall = time.monotonic() - started
    sim = _round_times(root / "sim-run")
    startup = _per_message_startup(env, data["site-a"], cache)

    d = sum(deploy) / len(deploy)
    s = sum(sim) / len(sim)
    print(f"rounds {args.rounds}; per-round time after round 1 (rounds 2..{args.rounds})")
    print(f"  deployment  {' '.join(f'{t:.1f}' for t in deploy)}  mean {d:.1f}s  (whole run {deploy_wall:.0f}s)")
    print(f"  simulation  {' '.join(f'{t:.1f}' for t in sim)}  mean {s:.1f}s  (whole run {sim_wall:.0f}s)")
    print(f"  a fresh process imports the ClientApp and loads the site in {startup:.1f}s (once per site now)")
    print(f"RESULT deploy_round_s={d:.2f} sim_round_s={s:.2f} ratio={d / s:.2f} process_startup_s={startup:.2f}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
