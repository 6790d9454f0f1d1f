"""The fedlens ServerApp: one federated run, recorded round by round.

The strategy owns the round loop; fedlens plugs in through its ``evaluate_fn``
(server-side test-set evaluation, recording, checkpointing, progress) and a
wrapper (:class:`SiteGuard`) that records each site's outcome and stops the run
when no site could train.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from shared.checkpoint import load_checkpoint
from shared.config import FedConfig
from shared.data import load_dataset
from shared.protocol import ROUND_OFFSET
from shared.rundir import RunDir
from shared.task import Task

from .guard import AllSitesFailed, SiteGuard, last_line
from .strategies import build_strategy

__all__ = ["app", "build_server_app", "serve", "AllSitesFailed"]

_log = logging.getLogger("fedlens.server")


def serve(grid: Grid, cfg: FedConfig, run: RunDir, *, started: float | None = None) -> dict[str, Any]:
    """Run (or continue) the federated training recorded in ``run``.

    Returns
    -------
    dict
        The run summary, also written to ``summary.json``.

    Raises
    ------
    AllSitesFailed
        When a round produced no usable update.
    """
    started = time.monotonic() if started is None else started
    random.seed(cfg.seed)  # Flower samples sites with the `random` module
    done = run.completed_rounds()
    previous_wall = run.records()[-1]["elapsed_s"] if done else 0.0
    _train_pool, test = load_dataset(cfg)
    task = Task(cfg, test.num_classes)
    if done:
        task.model.load_state_dict(load_checkpoint(run.path).state)
        _log.info("resuming after round %d of %d", done, cfg.num_rounds)
    test_data = task.prepare(test, for_training=False)
    guard = SiteGuard(build_strategy(cfg))

    def evaluate_fn(local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if local_round == 0:
            return None
        rnd = done + local_round
        task.load_trainable(arrays.to_torch_state_dict())
        report = task.evaluate(test_data)
        report_round = guard.current
        failures = guard.round_failures()
        elapsed = previous_wall + time.monotonic() - started
        record = {
            "round": rnd,
            "elapsed_s": round(elapsed, 2),
            "server": report.to_dict(),
            "federated_eval": report_round.evaluate_aggregate,
            "train": report_round.train_aggregate,
            "sites_train": report_round.train,
            "sites_eval": report_round.evaluate,
            "failures": failures,
        }
        run.record_round(record)
        run.save_model(task.model.state_dict(), cfg=cfg, classes=test.classes, round=rnd)
        ok = len(report_round.train)
        sampled = ok + sum(1 for v in failures.values() if v.startswith("train"))
        _log.info(
            "round %d/%d  accuracy %.4f  macro-F1 %.4f  loss %.4f  sites %d/%d ok  %.0fs",
            rnd, cfg.num_rounds, report.accuracy, report.macro_f1, report.loss, ok, sampled, elapsed,
        )  # fmt: skip
        return MetricRecord(report.scalars())

    remaining = cfg.num_rounds - done
    if remaining > 0:
        offset = ConfigRecord({ROUND_OFFSET: done})
        guard.start(
            grid=grid,
            initial_arrays=ArrayRecord(task.trainable_state()),
            num_rounds=remaining,
            timeout=cfg.round_timeout,
            train_config=ConfigRecord(dict(offset)),
            evaluate_config=ConfigRecord(dict(offset)),
            evaluate_fn=evaluate_fn,
        )
    records = run.records()
    summary = _summary(cfg, task, records, wall=previous_wall + time.monotonic() - started)
    run.finish(summary)
    return summary


def _summary(cfg: FedConfig, task: Task, records: list[dict[str, Any]], *, wall: float) -> dict[str, Any]:
    last = records[-1]["server"] if records else {}
    sites = sorted({s for r in records for s in (*r["sites_train"], *r["failures"])})
    failures: dict[str, list[str]] = {}
    for r in records:
        for site, reason in r["failures"].items():
            failures.setdefault(site, []).append(f"round {r['round']}: {last_line(reason)}")
    # What a site really sends: the trainable state as Flower serialises it.
    sent = ArrayRecord(task.trainable_state()).count_bytes()
    full = task.full_model_bytes()
    return {
        "final_accuracy": last.get("accuracy"),
        "final_macro_f1": last.get("macro_f1"),
        "final_loss": last.get("loss"),
        "final_roc_auc_macro": last.get("roc_auc_macro"),
        "rounds": len(records),
        "num_sites": len(sites),
        "sites": sites,
        "site_failures": failures,
        "wall_seconds": round(wall, 2),
        "bytes_per_site_round": sent,
        "full_model_bytes": full,
        "traffic_ratio": round(sent / full, 4),
        "backbone": cfg.backbone,
        "policy": cfg.policy,
        "strategy": cfg.strategy,
        "dataset": cfg.dataset,
        "mode": "federated",
        # Sites train without DP-SGD so far: say so in every summary.
        "private": False,
    }


def build_server_app(cfg: FedConfig | None = None, out_dir: str | Path | None = None, *, started: float | None = None) -> ServerApp:
    """A ServerApp; with ``cfg`` and ``out_dir`` it ignores Flower's run config.

    Without them (``flwr run``), the config comes from the run config and the run
    folder from its ``out-dir`` key.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg or FedConfig.from_run_config(context.run_config)
        if out_dir is not None:
            run = RunDir(out_dir)
        else:
            path = Path(str(context.run_config.get("out-dir", "runs/flwr"))) / str(context.run_id)
            run = RunDir.create(path, run_cfg)
        serve(grid, run_cfg, run, started=started)

    return app


app = build_server_app()
