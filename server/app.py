"""The fedlens ServerApp: one federated run, recorded round by round.

The strategy owns the round loop; fedlens plugs in through its ``evaluate_fn``
(server-side test-set evaluation, recording, checkpointing, progress) and a
wrapper (:class:`SiteGuard`) that records each site's outcome and stops the run
when no site could train.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import random
import time
from pathlib import Path
from typing import Any, Iterator

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted

from fedlens.shared.averaging import ModelAverage
from fedlens.shared.checkpoint import load_checkpoint
from fedlens.shared.config import RUN_DIR_KEY, FedConfig
from fedlens.shared.errors import ConfigError
from fedlens.shared.data import load_dataset
from fedlens.shared.protocol import ROUND_OFFSET, RUN_ID
from fedlens.shared.rundir import RunDir
from fedlens.shared.task import Task

from .central_dp import central_summary
from .guard import AllSitesFailed, RoundReport, RunStopped, SiteGuard, is_refusal, last_line
from .sites import wait_for_sites
from .strategies import build_strategy

__all__ = ["app", "build_server_app", "serve", "privacy_summary", "AllSitesFailed"]

_log = logging.getLogger("fedlens.server")


def serve(grid: Grid, cfg: FedConfig, run: RunDir, *, started: float | None = None, expect_sites: int = 0) -> dict[str, Any]:
    """Run (or continue) the federated training recorded in ``run``.

    Parameters
    ----------
    expect_sites : int, default 0
        Wait (up to a minute) for this many sites to connect before the first
        round. A local simulation registers its sites while the server starts;
        without the wait, round 1 could sample only the first ``min-sites``.

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
    averager = ModelAverage(cfg.ema_decay) if cfg.ema_decay else None
    if done:
        ckpt = load_checkpoint(run.path)
        task.model.load_state_dict(ckpt.state)
        if averager:  # the checkpoint holds the average; training continues from the plain aggregate
            if ckpt.training_state is None:
                raise ConfigError(
                    f"{run.path / 'model.safetensors'} has no training state to resume an `ema-decay` run from "
                    "(it was not written by this run's server); start a new run folder"
                )
            averager.restore(task.trainable_state())
            task.load_trainable(ckpt.training_state)
        _log.info("resuming after round %d of %d", done, cfg.num_rounds)
    initial = task.trainable_state()
    test_data = task.prepare(test, for_training=False)
    strategy = build_strategy(cfg, rounds_done=done)
    guard = SiteGuard(strategy)
    if expect_sites:
        _await_sites(grid, expect_sites, wait_s=_SITE_WAIT_S)

    def evaluate_fn(local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if local_round == 0:
            return None
        rnd = done + local_round
        aggregate = arrays.to_torch_state_dict()
        unaveraged = None
        if averager:
            task.load_trainable(aggregate)
            unaveraged = task.evaluate(test_data)
            task.load_trainable(averager.update(aggregate))
        else:
            task.load_trainable(aggregate)
        report = task.evaluate(test_data)
        report_round = guard.current
        failures = guard.round_failures()
        elapsed = previous_wall + time.monotonic() - started
        epsilons = {site: m["epsilon"] for site, m in report_round.train.items() if "epsilon" in m}
        central = central_summary(strategy, cfg)
        record = {
            "round": rnd,
            "elapsed_s": round(elapsed, 2),
            "server": report.to_dict(),
            "federated_eval": report_round.evaluate_aggregate,
            "train": report_round.train_aggregate,
            "sites_train": report_round.train,
            "sites_eval": report_round.evaluate,
            "failures": failures,
            "privacy": {"site_epsilon": epsilons, **({"central_epsilon": central["epsilon"]} if central else {})},
        }
        if unaveraged:  # "server" is the average over rounds; this is the round's own aggregate
            record["server_unaveraged"] = {"accuracy": unaveraged.accuracy, "loss": unaveraged.loss}
        run.record_round(record)
        run.save_model(task.model.state_dict(), cfg=cfg, classes=test.classes, round=rnd, training_state=aggregate if averager else None)
        ok = len(report_round.train)
        sampled = ok + sum(1 for v in failures.values() if v.startswith("train"))
        privacy = f"  max site ε {max(epsilons.values()):.2f}" if epsilons else "  NOT private"
        if central:
            privacy += f"  central ε {central['epsilon']:.2f}"
        averaged = f" (EMA; round's own {unaveraged.accuracy:.4f})" if unaveraged else ""
        _log.info(
            "round %d/%d  accuracy %.4f%s  macro-F1 %.4f  loss %.4f  sites %d/%d ok%s  %.0fs",
            rnd, cfg.num_rounds, report.accuracy, averaged, report.macro_f1, report.loss, ok, sampled, privacy, elapsed,
        )  # fmt: skip
        return MetricRecord(report.scalars())

    remaining = cfg.num_rounds - done
    stopped = None
    if remaining > 0:
        offset = {ROUND_OFFSET: done, RUN_ID: run.run_id}
        try:
            if cfg.secagg:
                _run_secagg(grid, cfg, guard, initial, offset, remaining, evaluate_fn)
            else:
                guard.start(
                    grid=grid,
                    initial_arrays=ArrayRecord(initial),
                    num_rounds=remaining,
                    timeout=cfg.round_timeout,
                    train_config=ConfigRecord(dict(offset)),
                    evaluate_config=ConfigRecord(dict(offset)),
                    evaluate_fn=evaluate_fn,
                )
        except (RunStopped, PrivacyBudgetExhausted) as exc:
            stopped = str(exc) if isinstance(exc, RunStopped) else f"central privacy budget: {exc}"
            _log.warning("run stopped early: %s", stopped)
    records = run.records()
    summary = _summary(cfg, task, records, wall=previous_wall + time.monotonic() - started)
    summary["privacy"] = privacy_summary(cfg, records, central=central_summary(strategy, cfg))
    summary["private"] = summary["privacy"]["private"]
    if stopped:
        summary["stopped_early"] = stopped
    if not summary["private"]:
        _log.warning("this run was NOT differentially private: %s", summary["privacy"]["reason"])
    run.finish(summary, stopped_early=stopped)
    return summary


_SITE_WAIT_S = 60.0


def _await_sites(grid: Grid, expected: int, *, wait_s: float) -> None:
    """Wait until ``expected`` sites are connected, or ``wait_s`` passed (then go on with those there)."""
    if (connected := len(wait_for_sites(grid, expected, wait_s=wait_s))) < expected:
        _log.warning("only %d of %d sites connected after %.0f s; starting with them", connected, expected, wait_s)


# SecAgg+ scales each site's values by num_examples / max_weight before clipping them
# to +/- secagg-clip-range: 10,000 keeps sites of up to that many images unscaled-up.
SECAGG_MAX_WEIGHT = 10_000.0


def _run_secagg(
    grid: Grid, cfg: FedConfig, guard: SiteGuard, initial: dict[str, Any], config: dict[str, Any], rounds: int, evaluate_fn: Any
) -> None:
    """FedAvg through SecAgg+ (legacy path, behind server.secagg); outcomes go to ``guard``."""
    from .secagg import run_secagg_rounds

    def on_round(_rnd: int, metrics: dict[str, dict[str, float]], failures: dict[int, str]) -> None:
        guard.current = RoundReport()
        guard.current.train = metrics
        guard.current.failed = dict(failures)

    try:
        run_secagg_rounds(
            grid,
            initial_arrays=ArrayRecord(initial),
            num_rounds=rounds,
            train_config=config,
            evaluate_fn=evaluate_fn,
            on_round=on_round,
            num_shares=cfg.secagg_shares,
            reconstruction_threshold=cfg.secagg_threshold,
            clipping_range=cfg.secagg_clip_range,
            max_weight=SECAGG_MAX_WEIGHT,
            min_sites=cfg.min_sites,
            timeout=cfg.round_timeout,
        )
    except RuntimeError as exc:
        if is_refusal(str(exc)):
            raise RunStopped(f"no site may train any more within its privacy budget: {exc}") from exc
        raise AllSitesFailed(str(exc)) from exc


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
        "ema_decay": cfg.ema_decay,
        **({"final_accuracy_unaveraged": records[-1]["server_unaveraged"]["accuracy"]} if records and "server_unaveraged" in records[-1] else {}),
        "dataset": cfg.dataset,
        "mode": "federated",
    }


def privacy_summary(cfg: FedConfig, records: list[dict[str, Any]], *, central: dict[str, Any] | None) -> dict[str, Any]:
    """Per-site DP facts from the sites' last replies, and whether the run was private.

    A run is private only if DP-SGD was on and every site that ever trained
    reported DP-SGD in every round it trained.
    """
    sites: dict[str, dict[str, Any]] = {}
    non_private: set[str] = set()
    for r in records:
        for site, m in r.get("sites_train", {}).items():
            if not m.get("dp"):
                non_private.add(site)
                continue
            sites[site] = {
                "epsilon": m["epsilon"],
                "delta": m["delta"],
                "noise_multiplier": m["noise-multiplier"],
                "sample_rate": m["sample-rate"],
                "steps": int(m["dp-steps"]),
                "accountant": cfg.accountant,
            }
    if not cfg.dp:
        reason = "dp = false: sites trained without DP-SGD"
    elif cfg.dp_reproducible:
        reason = "dp-reproducible = true: DP noise was seeded from the run config, which the server knows"
    elif non_private:
        reason = f"site(s) {', '.join(sorted(non_private))} trained without DP-SGD"
    elif not sites:
        reason = "no site completed a private round"
    else:
        reason = ""
    out: dict[str, Any] = {
        "private": not reason,
        "reason": reason,
        "sample_level": {
            "dp": cfg.dp,
            "target_epsilon": cfg.target_epsilon,
            "delta": cfg.delta,
            "max_grad_norm": cfg.max_grad_norm,
            "dp_mode": cfg.dp_mode,
            "secure_rng": cfg.secure_rng,
            "reproducible_noise": cfg.dp_reproducible,
        },
        "sites": dict(sorted(sites.items())),
        "max_site_epsilon": max((s["epsilon"] for s in sites.values()), default=None),
        "secure_aggregation": cfg.secagg,
    }
    if central:
        out["central"] = central
    return out


def build_server_app(cfg: FedConfig | None = None, out_dir: str | Path | None = None, *, started: float | None = None) -> ServerApp:
    """A ServerApp; with ``cfg`` and ``out_dir`` it ignores Flower's run config.

    Without them (``flwr run`` / ``fedlens run``), the config comes from the run
    config and the run folder from ``run-dir`` (created, or resumed when it already
    holds this run's checkpoint) or else ``out-dir/<flower run id>``.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg is not None and out_dir is not None:
            serve(grid, cfg, RunDir(out_dir), started=started, expect_sites=cfg.num_sites)
            return
        _log_through_flower()
        run, run_cfg = _open_run_dir(context)
        with _claim(run):
            try:
                serve(grid, run_cfg, run)
            except Exception as exc:
                run.set_status("failed", error=f"{type(exc).__name__}: {exc}")
                raise

    return app


@contextlib.contextmanager
def _claim(run: RunDir) -> Iterator[None]:
    """Hold the run folder for this ServerApp's lifetime: two servers on one run folder would
    train two global models from the same sites (and spend their privacy budgets twice)."""
    with open(run.path / ".server.lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another server app is running the run in {run.path}; stop it (`flwr stop RUN_ID`) before resuming") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _open_run_dir(context: Context) -> tuple[RunDir, FedConfig]:
    """The run folder of a deployed run: new, or resumed after a server restart."""
    run_cfg = FedConfig.from_run_config(context.run_config)
    target = str(context.run_config.get(RUN_DIR_KEY, ""))
    if not target:
        path = Path(str(context.run_config.get("out-dir", "runs/flwr"))) / str(context.run_id)
        return RunDir.create(path, run_cfg), run_cfg
    run = RunDir(target)
    if not (run.path / "config.toml").is_file():
        return RunDir.create(run.path, run_cfg), run_cfg
    saved = run.config()
    if saved != run_cfg:
        diff = sorted(k for k, v in saved.to_dict().items() if run_cfg.to_dict()[k] != v)
        raise ConfigError(f"{run.path} holds a run with a different config ({', '.join(diff)}); resume it with its own config.toml or pick a new folder")
    if run.status().get("status") == "finished":
        raise ConfigError(f"{run.path} holds a finished run; pick a new folder")
    done = run.prepare_resume()
    _log.info("resuming %s after round %d (Flower run %s)", run.path, done, context.run_id)
    return run, saved


def _log_through_flower() -> None:
    """Route fedlens' log lines into Flower's logger, so `flwr log` / `fedlens run` stream them."""
    ours = logging.getLogger("fedlens")
    if ours.handlers:
        return
    from flwr.common.logger import FLOWER_LOGGER

    for handler in FLOWER_LOGGER.handlers:
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False


app = build_server_app()
