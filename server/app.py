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
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import Strategy

from fedlens.shared.averaging import ModelAverage
from fedlens.shared.checkpoint import load_checkpoint
from fedlens.shared.config import RUN_DIR_KEY, FedConfig
from fedlens.shared.data import load_dataset
from fedlens.shared.errors import ConfigError
from fedlens.shared.metrics import ClassificationReport
from fedlens.shared.protocol import CLASSES, NUM_EXAMPLES, PRIVACY_METRICS, ROUND_OFFSET, RUN_ID, SITE_REGISTRY_ENV
from fedlens.shared.rundir import RunDir
from fedlens.shared.task import LocalData, Task, divergence_cause

from .central_dp import central_summary
from .flower_waits import PULL_BACKOFF_S, shorten_serverapp_waits
from .guard import AllSitesFailed, RoundReport, RunDiverged, RunStopped, SiteGuard, is_refusal, last_line
from .sites import RegistryNamedGrid, ShortPollGrid, SiteRegistry, wait_for_sites
from .strategies import build_strategy, weight_key
from .validate import UpdateRefused, UpdateValidator, norm_bound_rule

if TYPE_CHECKING:  # the legacy SecAgg+ module is imported only when a run uses it
    from .secagg import EvaluateFn

__all__ = ["app", "build_server_app", "serve", "privacy_summary", "AllSitesFailed", "RunDiverged"]

_log = logging.getLogger("fedlens.server")


def serve(
    grid: Grid,
    cfg: FedConfig,
    run: RunDir,
    *,
    started: float | None = None,
    expect_sites: int = 0,
    registry: SiteRegistry | None = None,
) -> dict[str, Any]:
    """Run (or continue) the federated training recorded in ``run``.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid.
    cfg : FedConfig
        The run's configuration.
    run : RunDir
        The run folder; rounds it already completed are not run again.
    started : float, optional
        ``time.monotonic()`` when the run (including data preparation) began;
        now when None.
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
    RunDiverged
        When the global model diverged (its test loss non-finite or exploding).

    Either way ``summary.json`` is written first, naming the reason and the round of
    the model that stays published (``published_round``; 0 when no round finished:
    then the model the run started from is published); the run's status is failed.
    """
    started = time.monotonic() if started is None else started
    done = run.completed_rounds()
    wall = _WallClock(started, previous=run.records()[-1]["elapsed_s"] if done else 0.0)
    _train_pool, test = load_dataset(cfg)
    task = Task(cfg, test.num_classes)
    averager = ModelAverage(cfg.ema_decay) if cfg.ema_decay else None
    if done:
        _resume(run, task, averager, done=done, num_rounds=cfg.num_rounds, classes=test.classes)
    initial = task.trainable_state()
    test_data = task.prepare(test, for_training=False)
    strategy = build_strategy(cfg, rounds_done=done)
    validator = UpdateValidator(cfg, weight_key=weight_key(cfg))
    _log.info("every update is validated before aggregation; update norm bound: %s", norm_bound_rule(cfg))
    guard = SiteGuard(strategy, registry, validator=validator)
    recorder = _RoundRecorder(cfg, run, task, test_data, classes=test.classes, guard=guard, averager=averager, rounds_done=done, wall=wall)
    if expect_sites:
        _await_sites(grid, expect_sites, wait_s=_SITE_WAIT_S)
    ending = _run_rounds(grid, cfg, run, guard, initial, recorder.evaluate, rounds_done=done, classes=test.classes)
    # The round that ended the run early has no record: its site failures go to the summary directly.
    unrecorded = guard.round_failures() if ending.stopped or ending.failed else {}
    if ending.failed is not None and run.completed_rounds() == 0:
        # Nothing better exists than what the run started from: publish that, as round 0, not nothing.
        task.load_trainable(initial)
        run.save_model(task.model.state_dict(), cfg=cfg, classes=test.classes, round=0)
    summary = _finish(cfg, run, task, strategy, ending=ending, unrecorded=unrecorded, wall=wall.seconds())
    if ending.failed is not None:
        raise ending.failed
    return summary


@dataclass(frozen=True)
class _Ending:
    """How the rounds ended: all done (both None), stopped early on privacy grounds, or failed."""

    stopped: str | None = None  # budgets ended the run: a clean end (exit 0)
    failed: AllSitesFailed | RunDiverged | None = None  # no usable update, or divergence: exit 1


@dataclass(frozen=True)
class _WallClock:
    """Wall time of the whole run: this process's share plus what earlier (resumed-from) processes spent."""

    started: float  # time.monotonic() when this process's part began
    previous: float = 0.0  # seconds recorded by the last completed round before this process

    def seconds(self) -> float:
        return self.previous + time.monotonic() - self.started


def _resume(run: RunDir, task: Task, averager: ModelAverage | None, *, done: int, num_rounds: int, classes: tuple[str, ...]) -> None:
    """Load the run's checkpoint into ``task`` (and ``averager``) to continue after round ``done``.

    Raises
    ------
    ConfigError
        When the checkpoint's classes are not ``classes`` (the evaluation data changed),
        or an ``ema-decay`` run's checkpoint has no training state to continue from.
    """
    ckpt = load_checkpoint(run.path)
    if list(ckpt.meta.get("classes", [])) != list(classes):
        raise ConfigError(
            f"{run.path / 'model.safetensors'} was trained on the classes {', '.join(ckpt.meta.get('classes', []))}, but the "
            f"evaluation data now gives {', '.join(classes)}; resume with the data the run started with, or set `classes`"
        )
    task.model.load_state_dict(ckpt.state)
    if averager:  # the checkpoint holds the average; training continues from the plain aggregate
        if ckpt.training_state is None:
            raise ConfigError(
                f"{run.path / 'model.safetensors'} has no training state to resume an `ema-decay` run from "
                "(it was not written by this run's server); start a new run folder"
            )
        averager.restore(task.trainable_state())
        task.load_trainable(ckpt.training_state)
    _log.info("resuming after round %d of %d", done, num_rounds)


class _RoundRecorder:
    """What happens after each aggregation: evaluate, record, checkpoint, one progress line.

    :meth:`evaluate` is the strategy's ``evaluate_fn``; the strategy calls it with
    rounds numbered from 1 in this process, the recorder numbers them across resumes.
    """

    def __init__(
        self,
        cfg: FedConfig,
        run: RunDir,
        task: Task,
        test_data: LocalData,
        *,
        classes: tuple[str, ...],
        guard: SiteGuard,
        averager: ModelAverage | None,
        rounds_done: int,
        wall: _WallClock,
    ) -> None:
        self.cfg, self.run, self.task, self.test_data, self.classes = cfg, run, task, test_data, classes
        self.guard, self.averager, self.rounds_done, self.wall = guard, averager, rounds_done, wall
        first = run.records()[:1] if rounds_done else []
        self.first_loss: float | None = first[0]["server"]["loss"] if first else None  # round 1's test loss

    def evaluate(self, local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Evaluate, record and checkpoint the aggregate of ``local_round`` (0: the initial model, skipped)."""
        if local_round == 0:
            return None
        rnd = self.rounds_done + local_round
        aggregate = arrays.to_torch_state_dict()
        report, unaveraged = self._evaluate(aggregate)
        self._check_divergence(rnd, report, unaveraged)  # before anything is recorded: the last good model stays
        elapsed = self.wall.seconds()
        record = self._record(rnd, report, unaveraged, elapsed)
        self.run.record_round(record)
        training_state = aggregate if self.averager else None
        self.run.save_model(self.task.model.state_dict(), cfg=self.cfg, classes=self.classes, round=rnd, training_state=training_state)
        self._log_progress(record, report, unaveraged, elapsed)
        return MetricRecord(report.scalars())

    def _check_divergence(self, rnd: int, report: ClassificationReport, unaveraged: ClassificationReport | None) -> None:
        """Raise :class:`RunDiverged` when the round's test loss is non-finite or far above round 1's.

        The reference is the larger of round 1's test loss and chance level (ln of the
        number of classes, what an untrained head scores): a model trained well in round
        1 must not make an ordinary wobble look like divergence. Round 1 itself is held to
        chance level. Under EMA the round's own aggregate counts (the average lags behind).
        """
        factor = self.cfg.divergence_factor
        loss = max(report.loss, unaveraged.loss) if unaveraged else report.loss
        if factor <= 0:
            return
        chance = math.log(max(len(self.classes), 2))
        reference = max(self.first_loss, chance) if self.first_loss is not None and rnd > 1 else chance
        if math.isfinite(loss) and loss <= factor * reference:
            if self.first_loss is None:
                self.first_loss = loss
            return
        what = "round 1's" if self.first_loss is not None and rnd > 1 and self.first_loss >= chance else "chance level's"
        raise RunDiverged(
            f"round {rnd}: the global model diverged: test loss {loss:.4g}, past {factor:g} x {what} {reference:.4g} "
            f"(divergence-factor). Likely cause: {divergence_cause(self.cfg, server=True, private=self.cfg.dp)}. "
            + f"The model of round {rnd - 1} stays published"
            + (" (the model the run started from)" if rnd == 1 else ""),
            round=rnd,
            loss=loss,
        )

    def _evaluate(self, aggregate: dict[str, Any]) -> tuple[ClassificationReport, ClassificationReport | None]:
        """The test-set report of the model to keep, and (with EMA) of the round's own aggregate."""
        unaveraged = None
        if self.averager:
            self.task.load_trainable(aggregate)
            unaveraged = self.task.evaluate(self.test_data)
            self.task.load_trainable(self.averager.update(aggregate))
        else:
            self.task.load_trainable(aggregate)
        return self.task.evaluate(self.test_data), unaveraged

    def _record(self, rnd: int, report: ClassificationReport, unaveraged: ClassificationReport | None, elapsed: float) -> dict[str, Any]:
        """The round's line in ``metrics.jsonl``."""
        sites = self.guard.current
        failures = self.guard.round_failures()
        epsilons = {site: m["epsilon"] for site, m in sites.train.items() if "epsilon" in m}
        central = central_summary(self.guard.inner, self.cfg)
        record = {
            "round": rnd,
            "elapsed_s": round(elapsed, 2),
            "server": report.to_dict(),
            "federated_eval": sites.evaluate_aggregate,
            "train": sites.train_aggregate,
            "sites_train": sites.train,
            "sites_eval": sites.evaluate,
            "failures": failures,
            "privacy": {"site_epsilon": epsilons, **({"central_epsilon": central["epsilon"]} if central else {})},
        }
        if unaveraged:  # "server" is the average over rounds; this is the round's own aggregate
            record["server_unaveraged"] = {"accuracy": unaveraged.accuracy, "loss": unaveraged.loss}
        return record

    def _log_progress(
        self, record: dict[str, Any], report: ClassificationReport, unaveraged: ClassificationReport | None, elapsed: float
    ) -> None:
        ok = len(record["sites_train"])
        sampled = ok + sum(1 for v in record["failures"].values() if v.startswith("train"))
        epsilons = record["privacy"]["site_epsilon"]
        privacy = f"  max site ε {max(epsilons.values()):.2f}" if epsilons else "  NOT private"
        if "central_epsilon" in record["privacy"]:
            privacy += f"  central ε {record['privacy']['central_epsilon']:.2f}"
        averaged = f" (EMA; round's own {unaveraged.accuracy:.4f})" if unaveraged else ""
        _log.info(
            "round %d/%d  accuracy %.4f%s  macro-F1 %.4f  loss %.4f  sites %d/%d ok%s  %.0fs",
            record["round"],
            self.cfg.num_rounds,
            report.accuracy,
            averaged,
            report.macro_f1,
            report.loss,
            ok,
            sampled,
            privacy,
            elapsed,
        )


def _run_rounds(
    grid: Grid,
    cfg: FedConfig,
    run: RunDir,
    guard: SiteGuard,
    initial: dict[str, Any],
    evaluate_fn: EvaluateFn,
    *,
    rounds_done: int,
    classes: tuple[str, ...],
) -> _Ending:
    """Train the rounds still to do; how they ended (early on privacy grounds, or failed).

    Every message carries the federation's label set (:data:`CLASSES`): sites build their
    classifier from it and map their own class names onto it.
    """
    remaining = cfg.num_rounds - rounds_done
    if remaining <= 0:
        return _Ending()
    sent = {ROUND_OFFSET: rounds_done, RUN_ID: run.run_id, CLASSES: list(classes)}  # in every message
    try:
        with _seeded_site_sampling(cfg.seed):
            if cfg.secagg:
                _run_secagg(grid, cfg, guard, initial, sent, remaining, evaluate_fn)
            else:
                guard.start(
                    grid=grid,
                    initial_arrays=ArrayRecord(initial),
                    num_rounds=remaining,
                    timeout=cfg.round_timeout,
                    train_config=ConfigRecord(dict(sent)),
                    evaluate_config=ConfigRecord(dict(sent)),
                    evaluate_fn=evaluate_fn,
                )
    except (RunStopped, PrivacyBudgetExhausted) as exc:
        stopped = str(exc) if isinstance(exc, RunStopped) else f"central privacy budget: {exc}"
        _log.warning("run stopped early: %s", stopped)
        return _Ending(stopped=stopped)
    except (AllSitesFailed, RunDiverged) as exc:
        _log.error("run failed: %s", exc)
        return _Ending(failed=exc)
    return _Ending()


@contextlib.contextmanager
def _seeded_site_sampling(seed: int) -> Iterator[None]:
    """Seed Python's global ``random`` generator for the round loop; restore the caller's state after.

    Flower 1.42 draws sites from the module-level generator and takes no seed or
    generator of its own: ``random.sample`` in ``sample_nodes``
    (``flwr.serverapp.strategy.strategy_utils``) for the Message-API strategies,
    ``random.sample`` in the legacy ``SimpleClientManager`` and ``random.shuffle``
    of the neighbour ring in ``SecAggPlusWorkflow`` for SecAgg+. Seeding that
    generator is the only way to make a run's site sampling follow ``seed``; this
    confines it to the rounds and gives the rest of the process its own state back.
    Anything else drawing from ``random`` in this process while the rounds run
    shifts the sequence, as before.
    """
    saved = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(saved)


def _finish(
    cfg: FedConfig, run: RunDir, task: Task, strategy: Strategy, *, ending: _Ending, unrecorded: dict[str, str], wall: float
) -> dict[str, Any]:
    """Write the run summary (results, traffic, privacy) and mark the run finished, or failed.

    ``unrecorded`` holds the site failures of a round that ended the run before it was
    recorded (every site refused, say); they count in ``site_failures`` like any other.
    ``published_round`` is the round of the model in ``model.safetensors`` (0: the model the run
    started from, published when the run failed before any round finished; or no model at all).
    """
    stopped = ending.stopped
    records = run.records()
    summary = _summary(cfg, task, records, wall=wall)
    for site, reason in unrecorded.items():
        summary["site_failures"].setdefault(site, []).append(f"round {len(records) + 1}: {last_line(reason)}")
        if site not in summary["sites"]:
            summary["sites"] = sorted([*summary["sites"], site])
            summary["num_sites"] = len(summary["sites"])
    summary["privacy"] = privacy_summary(cfg, records, central=central_summary(strategy, cfg))
    summary["private"] = summary["privacy"]["private"]
    summary["published_round"] = run.completed_rounds()
    if stopped:
        summary["stopped_early"] = stopped
    failed = ending.failed
    if failed is not None:
        summary["failed"] = str(failed)
        if isinstance(failed, RunDiverged):
            loss = failed.loss if math.isfinite(failed.loss) else str(failed.loss)
            summary["diverged"] = {"round": failed.round, "test_loss": loss}
    if not summary["private"]:
        _log.warning("this run was NOT differentially private: %s", summary["privacy"]["reason"])
    run.finish(summary, stopped_early=stopped, failed=str(failed) if failed is not None else None)
    return summary


_SITE_WAIT_S = 60.0


def _await_sites(grid: Grid, expected: int, *, wait_s: float) -> None:
    """Wait until ``expected`` sites are connected, or ``wait_s`` passed (then go on with those there)."""
    if (connected := len(wait_for_sites(grid, expected, wait_s=wait_s))) < expected:
        _log.warning("only %d of %d sites connected after %.0f s; starting with them", connected, expected, wait_s)


def _run_secagg(
    grid: Grid, cfg: FedConfig, guard: SiteGuard, initial: dict[str, Any], config: dict[str, Any], rounds: int, evaluate_fn: EvaluateFn
) -> None:
    """FedAvg through SecAgg+ (legacy path, behind server.secagg); outcomes go to ``guard``.

    The server never sees one site's update here, so the guard's validator checks what it
    can: each site's plaintext (count, DP accounting) and the masked vector's layout
    before the sum (a refused site is left out as a dropout), and the unmasked aggregate
    after it (layout, finiteness, the norm bound); a refused aggregate ends the run.
    """
    from .secagg import MAX_WEIGHT, QUANTIZATION_RANGE, run_secagg_rounds

    if guard.registry is not None:  # the SecAgg+ path reads site names off the replies
        grid = RegistryNamedGrid(grid, guard.registry)
    validator = guard.validator
    previous = [ArrayRecord(initial)]

    def check_reply(site: str, metrics: dict[str, float]) -> str | None:
        try:
            if validator is not None:
                validator.check_plaintext(site, metrics)
        except UpdateRefused as exc:
            return str(exc)
        return None

    def on_round(_rnd: int, metrics: dict[str, dict[str, float]], failures: dict[int, str], names: dict[int, str]) -> None:
        guard.current = RoundReport()
        guard.current.train = metrics
        guard.current.failed = dict(failures)
        if guard.registry is None:
            guard.names.update({node: name for node, name in names.items() if name not in guard.names.values()})

    def checked_evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord | None:
        if validator is not None:
            sites = list(guard.current.train.values())
            counts = [int(m[NUM_EXAMPLES]) for m in sites]
            # Secure aggregation quantises each site's value to 2 x clip / levels: the sum may be off by that much per site.
            per_value = len(sites) * 2 * cfg.secagg_clip_range / QUANTIZATION_RANGE * MAX_WEIGHT / max(sum(counts), 1)
            validator.expect(previous[0])
            try:
                validator.check_aggregate(
                    arrays,
                    counts=counts,
                    noises=[m.get("noise-multiplier") for m in sites],
                    tolerance=per_value * validator.num_params**0.5,
                )
            except UpdateRefused as exc:
                raise AllSitesFailed(
                    f"round {rnd}: the secure aggregate was refused: {exc}. Under SecAgg+ the server cannot tell which "
                    "site sent the bad update; the model of the previous round stays published"
                ) from None
        previous[0] = arrays
        return evaluate_fn(rnd, arrays)

    try:
        run_secagg_rounds(
            grid,
            initial_arrays=ArrayRecord(initial),
            num_rounds=rounds,
            train_config=config,
            evaluate_fn=checked_evaluate,
            on_round=on_round,
            check_reply=check_reply,
            num_shares=cfg.secagg_shares,
            reconstruction_threshold=cfg.secagg_threshold,
            clipping_range=cfg.secagg_clip_range,
            max_weight=MAX_WEIGHT,
            quantization_range=QUANTIZATION_RANGE,
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
        **(
            {"final_accuracy_unaveraged": records[-1]["server_unaveraged"]["accuracy"]}
            if records and "server_unaveraged" in records[-1]
            else {}
        ),
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
            if not m.get("dp") or any(key not in m for key in PRIVACY_METRICS):
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
        reason = "dp = false: the run asked sites to train without DP-SGD"
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
    holds this run's checkpoint) or else ``out-dir/<flower run id>``, and sites are
    named by the server's site registry (``FEDLENS_SITE_REGISTRY`` in the
    environment, set by ``fedlens server start``).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg is not None and out_dir is not None:
            serve(grid, cfg, RunDir(out_dir), started=started, expect_sites=cfg.num_sites)
            return
        _log_through_flower()
        grid = _short_waits(grid)
        run, run_cfg = _open_run_dir(context)
        registry = SiteRegistry.from_env()
        if registry is None:
            _log.warning(
                "no site registry (%s is set by `fedlens server start` with site authentication): sites are named as they call themselves",
                SITE_REGISTRY_ENV,
            )
        with _claim(run):
            try:
                serve(grid, run_cfg, run, registry=registry)
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
            raise ConfigError(
                f"another server app is running the run in {run.path}; stop it (`flwr stop RUN_ID`) before resuming"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _open_run_dir(context: Context) -> tuple[RunDir, FedConfig]:
    """The run folder of a deployed run: new, or resumed after a server restart.

    Raises
    ------
    ConfigError
        For a run that asks for simulated attacks (``attack``, ``attack-sites``): those
        are for ``fedlens simulate`` only.
    """
    run_cfg = FedConfig.from_run_config(context.run_config)
    if run_cfg.attack != "none" or run_cfg.attack_sites:
        raise ConfigError(
            "`attack` and `attack-sites` are for simulations only (`fedlens simulate`): a deployed run never "
            "asks its sites to attack; remove them from the run config"
        )
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
        raise ConfigError(
            f"{run.path} holds a run with a different config ({', '.join(diff)}); resume it with its own config.toml or pick a new folder"
        )
    if run.status().get("status") == "finished":
        raise ConfigError(f"{run.path} holds a finished run; pick a new folder")
    done = run.prepare_resume()
    _log.info("resuming %s after round %d (Flower run %s)", run.path, done, context.run_id)
    return run, saved


def _short_waits(grid: Grid) -> ShortPollGrid:
    """The deployed grid, asking for replies more often than Flower's 3 s and retrying their content sooner."""
    polled = ShortPollGrid(grid)
    if why_not := shorten_serverapp_waits():
        _log.warning("server waits: content still uploading is retried after Flower's own 1 s: %s", why_not)
    else:
        _log.info(
            "server waits: asks for replies every %.1f s, retries content still uploading after %.1f s (Flower's own: 3 s, 1 s)",
            polled.poll_s,
            PULL_BACKOFF_S,
        )
    return polled


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
