"""Deployment with many sites: per-round time and the server's memory against the sites per round.

One real deployment on loopback (TLS and site authentication on): `fedlens server
start` and `--sites` sites, each a `fedlens client start` process with 60 tiny images
(32 px, 3 classes). Then one `fedlens run` per setting, each sampling a different
number of sites per round (`fraction-train`, `min-sites`), with the default fine-tune
policy and, for the largest number (or the numbers given with `--full`), with
`policy = "full"` (every weight travels). A setting whose run fails is reported and
skipped; the `RESULT` line names it.
Per setting: per-round time (mean over rounds 2..N), and the server's memory: the
peak resident memory (RSS) of `fedlens server start` and all its descendants (the
SuperLink and the run's ServerApp process, which receives and averages the updates),
sampled every 0.2 s during the run, and its growth over the idle server.

    python benchmarks/deploy_scale.py [--sites 20] [--sampled 5,10,20] [--full 2,5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import PeakRss, tree_cpu_s, tree_rss
from _deploy import start_server, start_site, stop_children_on_sigterm

from fedlens.ops.certs import add_site, init_ca
from fedlens.ops.procs import Procs, flower_env, wait_for
from fedlens.shared.config import FedConfig
from fedlens.shared.data.samples import write_sample_folders


def _cli(env: dict[str, str], *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "fedlens.ops.cli", *args], env=env, check=True, capture_output=True, text=True).stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sites", type=int, default=20, help="sites started")
    p.add_argument("--sampled", default="5,10,20", help="comma list: sites per round, one run each (default policy)")
    p.add_argument(
        "--full",
        default=None,
        help="comma list: sites per round for the runs with policy = full (every weight travels); default: the largest of --sampled",
    )
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    stop_children_on_sigterm()
    sampled = [int(k) for k in args.sampled.split(",") if k]
    full_sampled = [int(k) for k in (args.full if args.full is not None else str(max(sampled))).split(",") if k]
    names = [f"site-{i:02d}" for i in range(args.sites)]
    root = Path(tempfile.mkdtemp(prefix="fedlens-deploy-scale-"))
    env = flower_env(FLWR_HOME=str(root / "flwr-home"))
    data = write_sample_folders(root / "images", ["server", *names])
    certs, state = root / "certs", root / "server"
    init_ca(certs, ["127.0.0.1"])
    procs = Procs(root / "logs", env)
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    try:
        server, port = start_server(procs, certs, state)
        started = time.monotonic()
        sites = []
        for name in names:
            add_site(certs, name)
            sites.append(
                start_site(procs, env, name=name, certs=certs, state=state, port=port, data=data[name], site_state=root / "state" / name)
            )

        def connected() -> int:
            return sum(
                1
                for s in json.loads(_cli(env, "server", "sites", "--state-dir", str(state), "--json")).values()
                if s.get("status") == "online"
            )

        wait_for(lambda: connected() == args.sites, 600, f"{args.sites} sites online", interval=5)
        print(f"{args.sites} sites online after {time.monotonic() - started:.0f}s", flush=True)
        time.sleep(5)
        idle = tree_rss(server.pid)
        # What connected sites cost while no run is going: their polls, and the server answering them.
        before = tree_cpu_s(server.pid), sum(tree_cpu_s(s.pid) for s in sites)
        time.sleep(30)
        server_cpu, sites_cpu = (tree_cpu_s(server.pid) - before[0]) / 30, (sum(tree_cpu_s(s.pid) for s in sites) - before[1]) / 30
        print(
            f"idle, {args.sites} sites online: the server uses {server_cpu:.0%} of a core, each site {sites_cpu / args.sites:.1%} "
            f"(polls only; the machine has {os.cpu_count()} cores)",
            flush=True,
        )
        settings = [(k, "last-1") for k in sampled] + [(k, "full") for k in full_sampled]
        for k, policy in settings:
            online = connected()
            if online < k:  # a run would wait for k sites forever: say so and go on
                print(f"{k:>3} sites/round, {policy:<6}: skipped, only {online} of {args.sites} sites online", flush=True)
                continue
            cfg = FedConfig.from_mapping(
                {
                    "dataset": "folder",
                    "data-path": str(data["server"]),
                    "test-fraction": 0.5,
                    "image-size": 32,
                    "batch-size": 16,
                    "lr": 0.05,  # the DP lr for batches of 16 (the default 0.5 is tuned for batches of 256)
                    "num-rounds": args.rounds,
                    "num-sites": args.sites,
                    "min-sites": k,
                    "fraction-train": k / args.sites,
                    "fraction-evaluate": k / args.sites,
                    "policy": policy,
                    "target-epsilon": 8.0,
                    "cache-dir": str(root / "cache"),
                }
            )
            cfg_file = root / f"run-{k}-{policy}.toml"
            cfg_file.write_text(cfg.to_toml())
            out = root / f"run-{k}-{policy}"
            sampler = PeakRss(server.pid)
            cpu_before = tree_cpu_s(server.pid), sum(tree_cpu_s(s.pid) for s in sites)
            run_started = time.monotonic()
            run = procs.start(f"run-{k}-{policy}", "run", "--state-dir", str(state), "--config", str(cfg_file), "--out", str(out))
            code = run.wait(timeout=1800)
            peak = sampler.stop()
            if code != 0:  # say why, and go on with the next setting
                failed.append(f"{k}-{policy}")
                reason = [line for line in procs.log(f"run-{k}-{policy}").splitlines() if "error" in line.lower()][-1:]
                print(f"{k:>3} sites/round, {policy:<6}: FAILED (exit {code}): {' '.join(reason)[:600]}", flush=True)
                continue
            run_wall = time.monotonic() - run_started
            server_run_cpu = tree_cpu_s(server.pid) - cpu_before[0]
            sites_run_cpu = sum(tree_cpu_s(s.pid) for s in sites) - cpu_before[1]
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            elapsed = [r["elapsed_s"] for r in records]
            summary = json.loads((out / "summary.json").read_text())
            row = {
                "sampled": k,
                "policy": policy,
                "round_s": (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1),
                "trained": sum(len(r["sites_train"]) for r in records) / len(records),
                "update_mb": summary["bytes_per_site_round"] / 1e6,
                "peak_mb": peak / 1e6,
                "growth_mb": (peak - idle) / 1e6,
                "rounds_s": [b - a for a, b in zip(elapsed, elapsed[1:])],
                # CPU seconds per round for the whole run (submission, start-up and round 1 included)
                "server_cpu_s": server_run_cpu / args.rounds,
                "site_cpu_s": sites_run_cpu / args.rounds / k,
                # share of the machine's cores busy with the deployment during the run
                "busy": (server_run_cpu + sites_run_cpu) / run_wall / (os.cpu_count() or 1),
            }
            rows.append(row)
            print(
                f"{k:>3} sites/round, {policy:<6}: {row['round_s']:5.1f} s/round, {row['trained']:.1f} trained/round, "
                f"update {row['update_mb']:.2f} MB/site, server peak {row['peak_mb']:.0f} MB (+{row['growth_mb']:.0f} MB over idle)",
                flush=True,
            )
            print(
                f"     rounds 2..: {', '.join(f'{t:.1f}' for t in row['rounds_s'])} s; CPU per round: server {row['server_cpu_s']:.1f} s, "
                f"each sampled site {row['site_cpu_s']:.1f} s; the machine's {os.cpu_count()} cores {row['busy']:.0%} busy",
                flush=True,
            )
    finally:
        procs.stop_all()
    default = [r for r in rows if r["policy"] == "last-1"]
    full = [r for r in rows if r["policy"] == "full"]
    values = [
        f"sites={args.sites}",
        f"idle_server_cores={server_cpu:.3f}",
        f"idle_site_cores={sites_cpu / args.sites:.4f}",
        *(f"round_s_{r['sampled']}={r['round_s']:.2f}" for r in default),
    ]
    values += [f"server_peak_mb_{r['sampled']}={r['peak_mb']:.0f}" for r in default]
    values += [f"site_cpu_s_{r['sampled']}={r['site_cpu_s']:.2f}" for r in default]
    values += [f"busy_{r['sampled']}={r['busy']:.2f}" for r in default]
    if default:
        values.append(f"update_mb_default={default[-1]['update_mb']:.3f}")
    for r in full:
        values += [f"round_s_full_{r['sampled']}={r['round_s']:.2f}", f"server_peak_mb_full_{r['sampled']}={r['peak_mb']:.0f}"]
    if full:
        values.append(f"update_mb_full={full[0]['update_mb']:.2f}")
    if failed:
        values.append("failed=" + ",".join(failed))
    print("RESULT " + " ".join(values), flush=True)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
