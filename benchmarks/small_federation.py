"""Small federations: federated vs centralized accuracy when every site holds a few hundred images.

5 sites sharing a seeded, stratified 4,000-image subset of Fashion-MNIST's training set
(Dirichlet alpha = 0.5 label skew), no DP (the non-private settings of
``benchmarks/accuracy.py``), 64 px, 10 rounds, FedAvg through Flower's simulation engine
(as ``fedlens simulate`` runs it). Every site trains on all its images
(``site-eval-fraction = 0``), so centralized training sees the very same 4,000 images;
it makes as many passes over them as the federated run made over the sites' data.

Two federated runs, each with its own centralized baseline:

- ``baseline``: one local epoch per round (``local-steps = 0``, the behaviour before
  ``local-steps``): a site of 800 images takes 13 optimiser steps per round;
- the configured defaults (``local-steps`` as set, 32 unless overridden).

    python benchmarks/small_federation.py [--set seed=1] [--out runs/bench-small]
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from _common import config, parser, result, setup_logging

from fedlens.shared.config import FedConfig
from fedlens.shared.data import load_dataset
from fedlens.shared.data.partition import partition
from fedlens.shared.task import local_split_indices, local_steps
from fedlens.simulations.runner import centralized, simulate


def _site_sizes(cfg: FedConfig) -> list[int]:
    """Training images per site, as the simulation partitions and splits them."""
    train, _test = load_dataset(cfg)
    labels = train.labels.numpy()
    return [len(local_split_indices(labels[idx], cfg.site_eval_fraction, seed=cfg.seed)[0]) for idx in partition(labels, cfg)]


def _images_seen(num_examples: int, steps: int, batch_size: int) -> int:
    """Images a site's round of ``steps`` batches goes through (passes are reshuffled, the last cut short)."""
    per_pass = math.ceil(num_examples / batch_size)
    passes, rest = divmod(steps, per_pass)
    return passes * num_examples + min(rest * batch_size, num_examples)


def _compare(cfg: FedConfig, sizes: list[int], out: Path) -> dict[str, Any]:
    """One federated run and centralized training with the same passes over the same images."""
    steps = [local_steps(n, batch_size=cfg.batch_size, epochs=cfg.local_epochs, min_steps=cfg.local_steps) for n in sizes]
    seen = sum(_images_seen(n, s, cfg.batch_size) for n, s in zip(sizes, steps))
    # One round of centralized training takes as many batches as all the sites' rounds together.
    pooled = dataclasses.replace(cfg, local_epochs=1, local_steps=round(seen / cfg.batch_size))
    t = time.monotonic()
    fed = simulate(cfg, out / "federated")
    fed_wall = time.monotonic() - t
    t = time.monotonic()
    cen = centralized(pooled, out / "centralized")
    return {
        "federated": fed["final_accuracy"],
        "centralized": cen["final_accuracy"],
        "ratio": fed["final_accuracy"] / cen["final_accuracy"],
        "passes": cfg.num_rounds * seen / sum(sizes),
        "site_steps": steps,
        "federated_wall_s": fed_wall,
        "centralized_wall_s": time.monotonic() - t,
    }


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup_logging()
    # One thread, like each simulated site (one CPU per Ray actor): the trainable part is
    # small, and on a loaded machine two threads mostly wait for each other.
    torch.set_num_threads(1)
    cfg = config(
        args,
        **{
            "dataset": "fashion-mnist",
            "max-train-images": 4000,
            "num-sites": 5,
            "partition": "dirichlet",
            "alpha": 0.5,
            "strategy": "fedavg",
            "dp": False,
            # the non-private settings of benchmarks/accuracy.py (--experiment non-private)
            "optimizer": "adam",
            "lr": 0.001,
            "batch-size": 64,
            "lora-rank": 0,
            "image-size": 64,
            "num-rounds": 10,
            "site-eval-fraction": 0.0,
            "report-per-class": 0,
        },
    )
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    sizes = _site_sizes(cfg)
    base = _compare(dataclasses.replace(cfg, local_steps=0), sizes, out / "baseline")
    new = _compare(cfg, sizes, out / "defaults")
    print(f"site training images: {sizes}")
    for name, row in (("one local epoch (baseline)", base), (f"local-steps = {cfg.local_steps}", new)):
        print(
            f"{name:<28} federated {row['federated']:.4f}  centralized {row['centralized']:.4f}  ratio {row['ratio']:.4f}  "
            f"passes {row['passes']:.1f}  steps per site and round {row['site_steps']}"
        )
    result(
        small_fed_acc=new["federated"],
        central_acc=new["centralized"],
        ratio=new["ratio"],
        baseline_fed_acc=base["federated"],
        baseline_central_acc=base["centralized"],
        baseline_ratio=base["ratio"],
        passes=new["passes"],
        baseline_passes=base["passes"],
        local_steps=cfg.local_steps,
        sites=cfg.num_sites,
        train_images=sum(sizes),
        min_site_images=min(sizes),
        max_site_images=max(sizes),
        wall_s=sum(r["federated_wall_s"] + r["centralized_wall_s"] for r in (base, new)),
    )


if __name__ == "__main__":
    main()
