"""Many simulated sites, few sampled: 10 vs 100 vs 1,000 sites with the same work per round.

Every run holds the same number of images per site (``--per-site``, IID) and samples
the same number of sites per round (``--sampled``, through ``fraction-train`` and
``fraction-evaluate``), so each round trains and evaluates the same amount of data;
only the size of the federation around them grows. Each run is a ``fedlens simulate``
process; its peak memory is the largest sum of the resident memory (RSS) of that
process and all its descendants (Ray's processes and site workers), sampled every
0.2 s. Per-round time is the mean gap between consecutive rounds' ``elapsed_s`` in
``metrics.jsonl`` (round 1 is left out: it includes the first site process's
start-up); start-up is the time from the process start to the end of round 1 minus
one round. The feature caches are warmed first, so no run pays for them.

    python benchmarks/scale.py [--sites 10,100,1000] [--rounds 3] [--set KEY=VALUE]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import PeakRss, config, parser, result, setup_logging

from fedlens.shared.config import FedConfig
from fedlens.shared.data import load_dataset
from fedlens.shared.task import Task


def _run(cfg: FedConfig, out: Path) -> dict[str, float]:
    overrides = [a for key, value in cfg.to_dict().items() for a in ("--set", f"{key}={json.dumps(value)}")]
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "fedlens"), "simulate", "--out", str(out), *overrides],
        stdout=subprocess.DEVNULL,
        stderr=open(out.with_suffix(".log"), "wb"),  # noqa: SIM115 (closed with the process)
    )
    sampler = PeakRss(proc.pid)
    code = proc.wait()
    wall = time.monotonic() - started
    peak = sampler.stop()
    if code != 0:
        raise SystemExit(f"fedlens simulate failed for {cfg.num_sites} sites; see {out.with_suffix('.log')}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in records]
    per_round = (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1)
    return {
        "peak_gb": peak / 1e9,
        "round_s": per_round,
        "startup_s": elapsed[0] - per_round,
        "wall_s": wall,
        "accuracy": records[-1]["server"]["accuracy"],
        "trained": sum(len(r["sites_train"]) for r in records) / len(records),
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sites", default="10,100,1000", help="comma list of federation sizes")
    p.add_argument("--sampled", type=int, default=10, help="sites sampled per round")
    p.add_argument("--per-site", type=int, default=60, help="training images per site")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    setup_logging()
    sizes = [int(s) for s in args.sites.split(",")]
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    runs: dict[int, dict[str, float]] = {}
    for n in sizes:
        cfg = config(
            args,
            defaults={"image-size": 32, "batch-size": 16, "lr": 0.05, "report-per-class": 0, "max-test-images": 1000},
            **{
                "num-sites": n,
                "num-rounds": args.rounds,
                "partition": "iid",
                "max-train-images": n * args.per_site,
                "fraction-train": args.sampled / n,
                "fraction-evaluate": args.sampled / n,
                "min-sites": args.sampled,
            },
        )
        train, test = load_dataset(cfg)  # warm the feature cache outside the measured runs
        task = Task(cfg, train.num_classes)
        task.prepare(train, for_training=True)
        task.prepare(test, for_training=False)
        del task, train, test
        runs[n] = _run(cfg, out / f"sites-{n}")
        r = runs[n]
        print(
            f"{n:>5} sites: peak {r['peak_gb']:.2f} GB, {r['round_s']:.1f} s/round, start-up {r['startup_s']:.1f} s, "
            f"wall {r['wall_s']:.0f} s, {r['trained']:.1f} sites trained per round, accuracy {r['accuracy']:.4f}",
            flush=True,
        )
    small, large = runs[sizes[0]], runs[sizes[-1]]
    result(
        memory_ratio=large["peak_gb"] / small["peak_gb"],
        round_ratio=large["round_s"] / small["round_s"],
        **{f"peak_gb_{n}": runs[n]["peak_gb"] for n in sizes},
        **{f"round_s_{n}": runs[n]["round_s"] for n in sizes},
        **{f"startup_s_{n}": runs[n]["startup_s"] for n in sizes},
    )


if __name__ == "__main__":
    main()
