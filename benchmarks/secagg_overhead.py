"""Secure-aggregation overhead: the same private run with and without SecAgg+.

Both runs use the same config, data, sites and DP-SGD (and no federated evaluation,
which the SecAgg+ path does not do); one aggregates through
Flower's SecAgg+ (masking, key sharing, unmasking: four exchanges per round), the
other sends updates in the clear to FedAvg. Measured back to back in one process, in
the order plain, SecAgg+, SecAgg+, plain; wall times are the means of the two runs each.

    python benchmarks/secagg_overhead.py [--set num-rounds=3]
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from _common import config, parser, result, setup_logging

from fedlens.shared.config import FedConfig
from fedlens.shared.data import load_dataset
from fedlens.shared.task import Task
from fedlens.simulations.runner import simulate


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup_logging()
    # No federated evaluation: the SecAgg+ path has none, so both runs do the same work.
    cfg = config(args, **{"num-rounds": 3, "fraction-evaluate": 0.0})
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    train, test = load_dataset(cfg)  # warm the feature cache for both runs
    task = Task(cfg, train.num_classes)
    task.prepare(train, for_training=True)
    task.prepare(test, for_training=False)
    del task
    walls: dict[str, float] = {"plain": 0.0, "secagg": 0.0}
    accs: dict[str, float] = {}
    # A-B-B-A: whichever run goes first pays one-off warm-up (page cache, imports).
    for i, secagg in enumerate((False, True, True, False)):
        name = "secagg" if secagg else "plain"
        t = time.monotonic()
        summary = simulate(FedConfig.from_mapping({"secagg": secagg}, base=cfg), out / f"{name}-{i}")
        walls[name] += (time.monotonic() - t) / 2
        accs[name] = summary["final_accuracy"]
    per_round = (walls["secagg"] - walls["plain"]) / cfg.num_rounds
    result(
        overhead_ratio=walls["secagg"] / walls["plain"],
        secagg_wall_s=walls["secagg"],
        plain_wall_s=walls["plain"],
        extra_s_per_round=per_round,
        secagg_accuracy=accs["secagg"],
        plain_accuracy=accs["plain"],
        rounds=cfg.num_rounds,
        sites=cfg.num_sites,
    )


if __name__ == "__main__":
    main()
