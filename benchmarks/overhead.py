"""Framework overhead: the Flower simulation vs the same local training without Flower.

Both do the same work: the same sites (partition), rounds, local epochs, site
evaluation, FedAvg and server-side test evaluation, from the same warm feature cache.
The plain run does it back to back in this process (benchmarks/_plain.py, the same
site code including DP-SGD and the privacy ledger); the simulation runs it through
Flower's simulation engine (Ray actors, one CPU each). Measured in one run, whole
(``overhead_ratio``) and per round after round 1 (``round_ratio``; the simulation's fixed
start-up, Ray and its actors, lands in round 1 and is ``simulation_startup_s``). Neither
side writes the end-of-run explainability report (``report-per-class = 0``): it is
work the plain loop does not do, not framework overhead.

By default it measures the non-private job (the settings ``dp = false`` takes:
:data:`~fedlens.shared.config.NON_PRIVATE_SETTINGS`); ``--private`` measures the default,
private job (DP-SGD and the privacy ledger at every site, on both sides).

    python benchmarks/overhead.py [--private] [--set num-rounds=3]
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from _common import config, parser, result, setup_logging
from _plain import plain_fedavg

from fedlens.shared.config import NON_PRIVATE_SETTINGS
from fedlens.shared.data import load_dataset
from fedlens.shared.task import Task
from fedlens.simulations.runner import simulate


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--private", action="store_true", help="the default private job (DP-SGD at every site)")
    args = p.parse_args()
    setup_logging()
    if args.private:
        cfg = config(args, **{"report-per-class": 0})
    else:  # the settings that train without DP (the DP-tuned defaults diverge without DP-SGD)
        cfg = config(args, defaults=NON_PRIVATE_SETTINGS, dp=False, **{"report-per-class": 0})
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    # Warm the feature cache so neither side pays for it.
    train, test = load_dataset(cfg)
    task = Task(cfg, train.num_classes)
    task.prepare(train, for_training=True)
    task.prepare(test, for_training=False)
    del task

    plain = plain_fedavg(cfg)
    plain_wall, plain_acc = plain.wall_s, plain.accuracy
    t = time.monotonic()
    summary = simulate(cfg, out / "simulation")
    sim_wall = time.monotonic() - t
    records = [json.loads(line) for line in (out / "simulation" / "metrics.jsonl").read_text().splitlines()]
    # Private sites keep their training time to themselves (it is a statistic of their images).
    site_train = sum(s.get("train-seconds", 0.0) for r in records for s in r["sites_train"].values())
    # The simulation's fixed start-up (Ray, its actors, loading the pool once per actor) lands in
    # round 1; after it, a round costs what its work costs. Rounds 2..n show the per-round cost.
    elapsed = [r["elapsed_s"] for r in records]
    sim_round = (elapsed[-1] - elapsed[0]) / max(len(elapsed) - 1, 1)
    ends = plain.round_ends_s
    plain_round = (ends[-1] - ends[0]) / max(len(ends) - 1, 1)
    result(
        overhead_ratio=sim_wall / plain_wall,
        round_ratio=sim_round / plain_round,
        simulation_round_s=sim_round,
        plain_round_s=plain_round,
        simulation_startup_s=sim_wall - sim_round * cfg.num_rounds,
        simulation_wall_s=sim_wall,
        plain_wall_s=plain_wall,
        simulation_accuracy=summary["final_accuracy"],
        plain_accuracy=plain_acc,
        simulation_site_train_s=site_train,
        rounds=cfg.num_rounds,
        sites=cfg.num_sites,
        private=int(cfg.dp),
    )


if __name__ == "__main__":
    main()
