"""Framework overhead: the Flower simulation vs the same local training without Flower.

Both do the same work: the same sites (partition), rounds, local epochs, site
evaluation, FedAvg and server-side test evaluation, from the same warm feature cache.
The plain run does it back to back in this process; the simulation runs it through
Flower's simulation engine (Ray actors, one CPU each). Measured in one run.

    python benchmarks/overhead.py [--set num-rounds=3]
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from _common import config, parser, result, setup_logging

from shared.data import load_dataset
from shared.task import Task, local_split, site_seed
from simulations.partition import partition
from simulations.runner import simulate


def plain_run(cfg) -> tuple[float, float]:
    """FedAvg by hand, no Flower: returns (wall seconds, final accuracy)."""
    started = time.monotonic()
    train, test = load_dataset(cfg)
    task = Task(cfg, train.num_classes)
    pool = task.prepare(train, for_training=True)
    test_data = task.prepare(test, for_training=False)
    labels = train.labels.numpy()
    sites = []
    for i, idx in enumerate(partition(labels, cfg)):
        sites.append((f"site-{i}", *local_split(pool.subset(torch.as_tensor(idx)), labels[idx], cfg.site_eval_fraction, seed=cfg.seed)))
    state = task.trainable_state()
    accuracy = 0.0
    for rnd in range(1, cfg.num_rounds + 1):
        updates, weights = [], []
        for name, site_train, _site_eval in sites:
            task.load_trainable(state)
            task.train(site_train, epochs=cfg.local_epochs, seed=site_seed(cfg.seed, rnd, name), lr=task.round_lr(rnd))
            updates.append(task.trainable_state())
            weights.append(len(site_train))
        total = sum(weights)
        state = {k: sum(u[k] * (w / total) for u, w in zip(updates, weights)) for k in state}
        task.load_trainable(state)
        for _name, _site_train, site_eval in sites:
            if len(site_eval):
                task.evaluate(site_eval)
        accuracy = task.evaluate(test_data).accuracy
    return time.monotonic() - started, accuracy


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup_logging()
    cfg = config(args)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    # Warm the feature cache so neither side pays for it.
    train, test = load_dataset(cfg)
    task = Task(cfg, train.num_classes)
    task.prepare(train, for_training=True)
    task.prepare(test, for_training=False)
    del task

    plain_wall, plain_acc = plain_run(cfg)
    t = time.monotonic()
    summary = simulate(cfg, out / "simulation")
    sim_wall = time.monotonic() - t
    records = [json.loads(line) for line in (out / "simulation" / "metrics.jsonl").read_text().splitlines()]
    site_train = sum(s["train-seconds"] for r in records for s in r["sites_train"].values())
    result(
        overhead_ratio=sim_wall / plain_wall,
        simulation_wall_s=sim_wall,
        plain_wall_s=plain_wall,
        simulation_accuracy=summary["final_accuracy"],
        plain_accuracy=plain_acc,
        simulation_site_train_s=site_train,
        rounds=cfg.num_rounds,
        sites=cfg.num_sites,
    )


if __name__ == "__main__":
    main()
