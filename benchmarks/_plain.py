"""FedAvg (or FedAvgM) by hand, without Flower: the same sites, rounds and DP-SGD as a simulation.

With ``ema-decay`` it evaluates the average over rounds, as the server publishes it.

Used as the no-framework reference (overhead) and for quick DP tuning sweeps: it
runs the exact site code path of fedlens (``Task.train`` inside the site's
:class:`~fedlens.shared.privacy.SitePrivacy`: budget decision, ledger, outbox) in one
process, so it also runs where Flower is not installed.
"""

from __future__ import annotations

import functools
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fedlens.shared.averaging import ModelAverage
from fedlens.shared.config import FedConfig
from fedlens.shared.data import load_dataset
from fedlens.shared.data.partition import partition
from fedlens.shared.privacy import DPSGD, DPRequest, PrivacyLedger, SiteBudget, SitePrivacy, SiteUpdate
from fedlens.shared.task import LocalData, Task, local_split, site_seed


@dataclass
class PlainResult:
    wall_s: float
    accuracy: float
    accuracies: list[float]
    max_epsilon: float
    round_ends_s: list[float]  # seconds from the start to the end of each round


def plain_fedavg(cfg: FedConfig, *, state_root: str | Path | None = None, site_eval: bool = True) -> PlainResult:
    """Run ``cfg`` as FedAvg in this process; DP-SGD at each site when ``cfg.dp``."""
    started = time.monotonic()
    train, test = load_dataset(cfg)
    task = Task(cfg, train.num_classes)
    pool = task.prepare(train, for_training=True)
    test_data = task.prepare(test, for_training=False)
    labels = train.labels.numpy()
    root = Path(state_root or tempfile.mkdtemp(prefix="fedlens-plain-"))
    budget = SiteBudget(max_epsilon=cfg.site_max_epsilon or cfg.target_epsilon, delta=cfg.delta) if cfg.dp else None
    request = DPRequest.from_config(cfg, run_id="plain") if cfg.dp else None
    sites = []
    for i, idx in enumerate(partition(labels, cfg)):
        name = f"site-{i}"
        site_train, site_held = local_split(pool.subset(torch.as_tensor(idx)), labels[idx], cfg.site_eval_fraction, seed=cfg.seed)
        privacy = SitePrivacy(budget, PrivacyLedger(root / name), site=name) if budget else None
        sites.append((name, site_train, site_held, privacy))
    state = task.trainable_state()
    accuracies, max_eps, round_ends = [], 0.0, []
    momentum: dict[str, torch.Tensor] = {}
    average = ModelAverage(cfg.ema_decay) if cfg.ema_decay else None
    for rnd in range(1, cfg.num_rounds + 1):
        updates, weights = [], []
        for name, site_train, _held, privacy in sites:
            local = functools.partial(_local_round, task, cfg, state, site_train, name=name, rnd=rnd)
            if privacy and request:  # the site's budget decision, ledger and outbox, as in the ClientApp
                update, num_examples, metrics = privacy.run_round(
                    request=request, round=rnd, global_state=state, num_examples=len(site_train), train=local
                )
                max_eps = max(max_eps, metrics["epsilon"])
            else:
                update, num_examples, _metrics = local(None)
            updates.append(update)
            weights.append(num_examples)
        total = sum(weights)
        averaged = {k: sum(u[k] * (w / total) for u, w in zip(updates, weights)) for k in state}
        state = _server_step(cfg, state, averaged, momentum)
        task.load_trainable(average.update(state) if average else state)  # what the server publishes
        if site_eval:
            for _name, _train, held, _privacy in sites:
                if len(held):
                    task.evaluate(held)
        accuracies.append(task.evaluate(test_data).accuracy)
        round_ends.append(time.monotonic() - started)
    return PlainResult(time.monotonic() - started, accuracies[-1], accuracies, max_eps, round_ends)


def _local_round(
    task: Task, cfg: FedConfig, state: dict[str, torch.Tensor], data: LocalData, dp: DPSGD | None, *, name: str, rnd: int
) -> SiteUpdate:
    """A site's local training from ``state``, as the ClientApp does it."""
    task.load_trainable(state)
    min_steps = cfg.local_steps if dp is None else 0
    task.train(data, epochs=cfg.local_epochs, seed=site_seed(cfg.seed, rnd, name), lr=task.round_lr(rnd), min_steps=min_steps, dp=dp)
    return task.trainable_state(), len(data), {}


def _server_step(
    cfg: FedConfig, state: dict[str, torch.Tensor], averaged: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The server's update: plain FedAvg, or FedAvgM as Flower computes it."""
    if cfg.strategy == "fedavg":
        return averaged
    if cfg.strategy != "fedavgm":
        raise ValueError(f"the plain loop runs fedavg and fedavgm, not {cfg.strategy!r}")
    out = {}
    for k, old in state.items():
        grad = old - averaged[k]
        momentum[k] = cfg.server_momentum * momentum[k] + grad if k in momentum else grad
        out[k] = old - cfg.server_learning_rate() * momentum[k]
    return out
