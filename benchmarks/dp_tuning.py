"""DP hyper-parameter sweep: final test accuracy per (variant, epsilon), without Flower.

Each cell is a full federated run (partition, rounds, DP-SGD at every site with
its budget and ledger) done by ``benchmarks/_plain.py`` in one process, so cells
can run in parallel (``--jobs``) and on a GPU machine without Flower installed.
Use it to choose settings; the privacy-utility table itself comes from
``benchmarks/privacy_utility.py`` (real Flower simulation).

    python benchmarks/dp_tuning.py --epsilons 3,8 \
        --variant "adam:optimizer=adam,lr=0.001" --variant "sgd:optimizer=sgd,lr=0.05" [--jobs 4]

A variant may carry its own epsilons (``name@3,8:k=v,...``); ``--variants FILE`` reads
one variant per line (``#`` starts a comment). Rows print as cells finish.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import time
from pathlib import Path

import torch
from _common import config, parser, result, setup_logging
from _plain import plain_fedavg

from fedlens.shared.config import FedConfig, parse_overrides
from fedlens.shared.data import load_dataset
from fedlens.shared.task import Task


def _variant(text: str) -> tuple[str, list[float] | None, dict[str, object]]:
    head, _, body = text.partition(":")
    name, _, eps = head.partition("@")
    epsilons = [float(e) for e in eps.split(",")] if eps else None
    return name, epsilons, parse_overrides([item for item in body.split(",") if item]) if body else {}


def _cell(args: tuple[dict[str, object], str, float, int]) -> tuple[str, float, float, float, float]:
    cfg_dict, name, epsilon, threads = args
    if threads:
        torch.set_num_threads(threads)
    cfg = FedConfig.from_mapping(cfg_dict)
    if epsilon > 0:
        cfg = FedConfig.from_mapping({"dp": True, "target-epsilon": epsilon}, base=cfg)
    else:
        cfg = FedConfig.from_mapping({"dp": False}, base=cfg)
    try:
        res = plain_fedavg(cfg, site_eval=False)
    except Exception as exc:  # one bad cell must not end the sweep
        print(f"  {name:<18} eps {epsilon if epsilon > 0 else 'inf':>5}  FAILED: {type(exc).__name__}: {exc}", flush=True)
        return name, epsilon, float("nan"), float("nan"), 0.0
    print(
        f"  {name:<18} eps {epsilon if epsilon > 0 else 'inf':>5}  acc {res.accuracy:.4f}  "
        f"(curve {' '.join(f'{a:.3f}' for a in res.accuracies[:: max(1, len(res.accuracies) // 5)])})  "
        f"max eps {res.max_epsilon:.3f}  {res.wall_s:.0f}s",
        flush=True,
    )
    return name, epsilon, res.accuracy, res.max_epsilon, res.wall_s


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--epsilons", default="3,8", help="comma list; 0 = non-private")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:K=V,K=V", help="settings to try (repeatable)")
    p.add_argument("--variants", metavar="FILE", help="more variants, one per line")
    p.add_argument("--jobs", type=int, default=1, help="cells run in parallel processes")
    args = p.parse_args()
    setup_logging()
    base = config(args)
    texts = list(args.variant)
    if args.variants:
        lines = (line.split("#", 1)[0].strip() for line in Path(args.variants).read_text().splitlines())
        texts += [line for line in lines if line]
    variants = [_variant(v) for v in (texts or ["default:"])]
    default_eps = [float(e) for e in args.epsilons.split(",")]
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else 0
    cells = []
    for name, epsilons, overrides in variants:
        cfg = FedConfig.from_mapping(overrides, base=base)
        # Compute each feature cache once, before the workers start (never read it here).
        train, test = load_dataset(cfg)
        task = Task(cfg, train.num_classes)
        for images, for_training in ((train, True), (test, False)):
            if task.needs_feature_pass(images, for_training=for_training):
                task.prepare(images, for_training=for_training)
        del task, train, test
        for eps in epsilons or default_eps:
            cells.append((cfg.to_dict(), name, eps, threads))
    started = time.monotonic()
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            rows = list(pool.imap_unordered(_cell, cells, chunksize=1))
    else:
        rows = [_cell(c) for c in cells]
    print(f"{'variant':<18} {'epsilon':>7} {'accuracy':>9} {'spent':>7} {'wall s':>7}")
    for name, eps, acc, spent, wall in sorted(rows, key=lambda r: 1.0 if math.isnan(r[2]) else -r[2]):
        print(f"{name:<18} {eps if eps > 0 else 'inf':>7} {acc:>9.4f} {spent:>7.3f} {wall:>7.0f}")
    best = max(rows, key=lambda r: -1.0 if math.isnan(r[2]) else r[2])
    result(cells=len(rows), best_variant=best[0], best_epsilon=best[1], best_accuracy=best[2], wall_s=time.monotonic() - started)


if __name__ == "__main__":
    main()
