"""Run a federation locally on Flower's simulation engine, or its centralized baseline."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedlens.shared.config import FedConfig
from fedlens.shared.data import load_dataset
from fedlens.shared.data.partition import class_counts, partition
from fedlens.shared.errors import DataError, FedlensError
from fedlens.shared.privacy import check_privacy_params
from fedlens.shared.privacy.dpsgd import INSECURE_RNG_WARNING, secure_generator
from fedlens.shared.protocol import FLOWER_ENV
from fedlens.shared.rundir import SITES_DIR, RunDir
from fedlens.shared.task import Task, local_split_indices

__all__ = ["simulate", "centralized", "SimulationFailed", "quiet_flower"]

_log = logging.getLogger("fedlens.simulations")

# Ray, under the simulation engine: keep every site's log line, and leave
# CUDA_VISIBLE_DEVICES alone for sites that asked for no GPU.
_RAY_ENV = {"RAY_DEDUP_LOGS": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


class SimulationFailed(FedlensError):
    """The federated run stopped before finishing; the message says why."""


# Flower notices dropped from a local simulation's log, by a fragment of their text.
# Flower 1.42 logs this one on every `run_simulation` call (`warn_deprecated_feature`);
# `simulate` calls it on purpose and the advice (use `flwr run`) is for Flower app
# authors, not for a fedlens user. Every other notice, such as a deprecation on the
# legacy SecAgg+ path, must still show.
_DROPPED_FLOWER_NOTICES = ("The `run_simulation` function is deprecated",)


class _DropRunSimulationNotice(logging.Filter):
    """Drop Flower's notices listed in ``_DROPPED_FLOWER_NOTICES``; keep every other line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in _DROPPED_FLOWER_NOTICES)


def quiet_flower() -> None:
    """Keep Flower's per-message INFO logs off the terminal (warnings still show)."""
    for key, value in {**FLOWER_ENV, **_RAY_ENV}.items():
        os.environ.setdefault(key, value)
    import flwr.simulation  # noqa: F401  (importing Flower resets its logger to DEBUG)

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.WARNING)
    for handler in flwr_logger.handlers:
        if not any(isinstance(f, _DropRunSimulationNotice) for f in handler.filters):  # once per handler
            handler.addFilter(_DropRunSimulationNotice())


# Up to this many sites the log shows each site's class counts; more get a summary
# (every site's counts are in the run folder's partitions.json either way).
_SITE_ROWS = 20


def _log_partitions(cfg: FedConfig, counts: list[list[int]], classes: tuple[str, ...]) -> None:
    _log.info("%s partition of %d images over %d sites (seed %d):", cfg.partition, sum(map(sum, counts)), cfg.num_sites, cfg.seed)
    if len(counts) > _SITE_ROWS:
        sizes = np.array([sum(row) for row in counts])
        held = np.array([sum(1 for n in row if n) for row in counts])
        _log.info(
            "images per site: min %d, median %d, max %d; classes per site: min %d, median %d, max %d (each site's counts: partitions.json)",
            sizes.min(),
            int(np.median(sizes)),
            sizes.max(),
            held.min(),
            int(np.median(held)),
            held.max(),
        )
        return
    width = max(5, *(len(str(max(row))) for row in counts))
    header = "site      " + " ".join(f"{c[:width]:>{width}}" for c in classes) + "   total"
    _log.info("%s", header)
    for i, row in enumerate(counts):
        _log.info("%s", f"site-{i:<4} " + " ".join(f"{n:>{width}}" for n in row) + f"   {sum(row):>5}")


def _check_privacy(cfg: FedConfig, labels: np.ndarray, sites: list[np.ndarray]) -> None:
    """Fail fast on DP settings no site could run with; say loudly when the run is not private."""
    if not cfg.dp:
        _log.warning("!" * 78)
        _log.warning("dp = false: this run is NOT differentially private. Sites train without DP-SGD and")
        _log.warning("their updates can leak their images. Use it only for baselines on public data")
        _log.warning(
            "Training with optimizer %s, lr %g, batch-size %d, lora-rank %d (DP-tuned keys left unset take their",
            cfg.optimizer,
            cfg.lr,
            cfg.batch_size,
            cfg.lora_rank,
        )
        _log.warning("non-private values with dp = false; `fedlens config --keys` marks them).")
        _log.warning("!" * 78)
        return
    if cfg.secure_rng:
        secure_generator()  # raises with instructions when torchcsprng is missing
    else:
        _log.warning("%s", INSECURE_RNG_WARNING)
    sizes = [len(local_split_indices(labels[idx], cfg.site_eval_fraction, seed=cfg.seed)[0]) for idx in sites]
    usable = [n for n in sizes if n > cfg.batch_size]
    if len(usable) < min(cfg.min_sites, len(sizes)):
        raise DataError(
            f"only {len(usable)} of {len(sizes)} sites hold more training images than `batch-size` ({cfg.batch_size}; "
            f"the smallest holds {min(sizes)}), and a round needs `min-sites` = {cfg.min_sites}: DP-SGD cannot subsample "
            f"a site no larger than one batch. Lower `batch-size` (e.g. {max(1, min(sizes) // 8)}) or use fewer, larger sites"
        )
    if len(usable) < len(sizes):
        # Such a site refuses the round when sampled (DP-SGD would see every image at every
        # step, no subsampling to account for) and the round goes on with the others.
        _log.warning(
            "%d of %d sites hold no more training images than one DP batch (batch-size %d; the smallest holds %d): "
            "they refuse every round they are sampled for and the rounds go on without them; "
            "lower batch-size, or use fewer, larger sites, to include them",
            len(sizes) - len(usable),
            len(sizes),
            cfg.batch_size,
            min(sizes),
        )
    smallest = min(usable)
    for warning in check_privacy_params(epsilon=cfg.target_epsilon, delta=cfg.delta, dataset_size=smallest):
        _log.warning("smallest site: %s", warning)
    _log.info(
        "DP-SGD at every site: target epsilon %g, delta %g, clipping %g, %s accountant; per-site budgets %s",
        cfg.target_epsilon,
        cfg.delta,
        cfg.max_grad_norm,
        cfg.accountant,
        cfg.site_budgets or f"{cfg.site_max_epsilon or cfg.target_epsilon:g} each",
    )


def simulate(cfg: FedConfig, out: str | Path, *, resume: bool = False) -> dict[str, Any]:
    """Run the federated simulation described by ``cfg`` into ``out``.

    Data, partitions and the frozen-feature cache are prepared (and validated)
    before Flower starts, so bad input fails fast and the cache is computed once.

    Raises
    ------
    SimulationFailed
        If the run stops early (every site failed in a round, the server crashed).
    """
    started = time.monotonic()
    quiet_flower()
    if resume:
        run = RunDir(out)
        cfg = run.config()
        if run.status().get("status") == "finished":
            _log.info("run in %s already finished all %d rounds; nothing to do", out, cfg.num_rounds)
            return run.read_json("summary.json")
        run.prepare_resume()
    backend = _backend_config(cfg)  # an attached cluster is checked before any work
    try:
        return _simulate(cfg, out, resume=resume, backend=backend, started=started)
    finally:
        if cfg.ray_address:  # Flower disconnects on a normal end; make sure of it on every end
            import ray

            if ray.is_initialized():
                ray.shutdown()


def _simulate(cfg: FedConfig, out: str | Path, *, resume: bool, backend: dict[str, Any], started: float) -> dict[str, Any]:
    run = RunDir(out) if resume else None
    train, test = load_dataset(cfg)
    sites = partition(train.labels.numpy(), cfg)
    if run is None:
        run = RunDir.create(out, cfg)  # only once data and partition are known to be valid
    counts = class_counts(train.labels.numpy(), sites, train.num_classes)
    run.write_json(
        "partitions.json",
        {
            "partition": cfg.partition,
            "alpha": cfg.alpha,
            "seed": cfg.seed,
            "classes": list(train.classes),
            "class_counts": {f"site-{i}": c for i, c in enumerate(counts)},
        },
    )
    _log_partitions(cfg, counts, train.classes)
    _check_privacy(cfg, train.labels.numpy(), sites)
    prep = time.monotonic()
    task = Task(cfg, train.num_classes)
    task.prepare(train, for_training=True)  # warms the on-disk feature cache once for all sites
    task.prepare(test, for_training=False)
    _log.info("data and frozen features ready in %.0fs; starting %d simulated sites", time.monotonic() - prep, cfg.num_sites)
    del task

    from flwr.simulation import run_simulation

    from fedlens.client.app import build_client_app
    from fedlens.server.app import build_server_app

    (run.path / SITES_DIR).mkdir(exist_ok=True)  # simulated sites check that they see it (shared storage)
    try:
        run_simulation(
            server_app=build_server_app(cfg, run.path, started=started),
            client_app=build_client_app(cfg, state_root=run.path / SITES_DIR),
            num_supernodes=cfg.num_sites,
            backend_config=backend,  # type: ignore[arg-type]
        )
    except Exception as exc:  # the ServerApp's exception, re-raised by Flower
        reason = str(exc) or type(exc).__name__
        run.set_status("failed", reason=reason)
        raise SimulationFailed(f"the federated run stopped: {reason}. Artifacts so far are in {run.path}") from exc
    status = run.status()
    if status.get("status") != "finished":
        run.set_status("failed", reason="the server app ended without finishing the run")
        raise SimulationFailed(f"the federated run ended without finishing; see {run.path}")
    summary = run.read_json("summary.json")
    if cfg.report_per_class > 0 and run.completed_rounds() > 0:
        _report(cfg, run, test)
    return summary


def _backend_config(cfg: FedConfig) -> dict[str, Any]:
    """Flower's Ray backend settings: a private local Ray, or an attached cluster.

    A private Ray gets this machine's cores and GPUs. An attached cluster
    (``ray-address``) keeps its own resources; Ray is connected here first, so
    that a wrong address or a cluster too small for one site fails before the run
    starts, with the cluster's resources in the message.

    Raises
    ------
    SimulationFailed
        If the cluster cannot be reached or cannot fit one site.
    """
    resources: dict[str, float] = {"num_cpus": cfg.site_cpus, "num_gpus": 0.0}
    if not cfg.ray_address:
        # address="local": never join a cluster that `ray start` left on this machine.
        init_args: dict[str, Any] = {"address": "local", "num_cpus": os.cpu_count() or 1}
        if cfg.device != "cpu":
            import torch

            if torch.cuda.is_available():
                resources["num_gpus"] = cfg.site_gpus
                init_args["num_gpus"] = torch.cuda.device_count()
        return {"client_resources": resources, "init_args": init_args}

    import ray

    host, _, port = cfg.ray_address.rpartition(":")
    try:  # Ray itself retries an unreachable address for minutes
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise SimulationFailed(
            f"cannot attach to the Ray cluster at {cfg.ray_address!r}: nothing answers there ({exc}). Start it with `ray start --head` "
            "(and `ray start --address HEAD:PORT` on every other node), or leave `ray-address` empty for a private local Ray"
        ) from exc
    try:
        ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=True)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise SimulationFailed(
            f"cannot attach to the Ray cluster at {cfg.ray_address!r}: {exc}. Start it with `ray start --head` "
            "(and `ray start --address HEAD:PORT` on every other node), or leave `ray-address` empty for a private local Ray"
        ) from exc
    total = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus, gpus = float(total.get("CPU", 0.0)), float(total.get("GPU", 0.0))
    if gpus > 0 and cfg.device != "cpu":
        resources["num_gpus"] = cfg.site_gpus
    elif cfg.device == "cuda":
        ray.shutdown()
        raise SimulationFailed(f'`device = "cuda"` but the Ray cluster at {cfg.ray_address} has no GPU')
    if cpus < cfg.site_cpus:
        ray.shutdown()
        raise SimulationFailed(
            f"the Ray cluster at {cfg.ray_address} offers {cpus:g} CPUs, less than one site's `site-cpus` = {cfg.site_cpus:g}"
        )
    at_once = int(cpus // cfg.site_cpus)
    if resources["num_gpus"]:
        at_once = min(at_once, int(gpus // resources["num_gpus"]))
    _log.info(
        "attached to the Ray cluster at %s: %d nodes, %g CPUs, %g GPUs; up to %d sites train at once",
        cfg.ray_address,
        len(nodes),
        cpus,
        gpus,
        at_once,
    )
    return {"client_resources": resources}


def _report(cfg: FedConfig, run: RunDir, test: Any) -> None:
    """The explainability report of the final model on the test set (``report/``)."""
    from fedlens.shared.explain import ExplainOptions, explain

    _log.info("explainability report: %d test images per class", cfg.report_per_class)
    try:
        explain(run.path, test, run.path / "report", ExplainOptions(per_class=cfg.report_per_class, seed=cfg.seed))
    except FedlensError as exc:  # the run itself succeeded: say why there is no report, keep going
        _log.warning("no explainability report: %s", exc)


def centralized(cfg: FedConfig, out: str | Path) -> dict[str, Any]:
    """Train the same model on the pooled data: the baseline for federated numbers.

    Each of its ``num-rounds`` rounds does what one site holding the whole pool would
    do in a round of the federated run (``local-epochs`` passes; at least ``local-steps``
    steps when the run is non-private, as at the sites), evaluating on the same
    held-out test set after each round. That is the number of passes a federated run
    makes over every site's data unless ``local-steps`` makes small sites take extra
    passes; then raise it here to match (as ``benchmarks/small_federation.py`` does).
    """
    started = time.monotonic()
    if cfg.dp:
        _log.warning(
            "the centralized baseline trains without DP-SGD, but this config is tuned for it (dp = true); "
            "`fedlens centralized` starts from dp = false unless the config sets dp"
        )
    train, test = load_dataset(cfg)
    run = RunDir.create(out, cfg)
    task = Task(cfg, train.num_classes)
    train_data = task.prepare(train, for_training=True)
    test_data = task.prepare(test, for_training=False)
    min_steps = 0 if cfg.dp else cfg.local_steps  # private sites take the steps DP-SGD accounts for, no floor
    for rnd in range(1, cfg.num_rounds + 1):
        stats = task.train(train_data, epochs=cfg.local_epochs, seed=cfg.seed * 1000 + rnd, lr=task.round_lr(rnd), min_steps=min_steps)
        report = task.evaluate(test_data)
        elapsed = time.monotonic() - started
        run.record_round(
            {
                "round": rnd,
                "elapsed_s": round(elapsed, 2),
                "server": report.to_dict(),
                "train": {"train-loss": stats.loss, "train-accuracy": stats.accuracy, "train-steps": stats.steps},
            }
        )
        run.save_model(task.model.state_dict(), cfg=cfg, classes=test.classes, round=rnd)
        _log.info(
            "round %d/%d  accuracy %.4f  macro-F1 %.4f  loss %.4f  %d steps  %.0fs",
            rnd,
            cfg.num_rounds,
            report.accuracy,
            report.macro_f1,
            report.loss,
            stats.steps,
            elapsed,
        )
    last = run.records()[-1]["server"]
    summary = {
        "final_accuracy": last["accuracy"],
        "final_macro_f1": last["macro_f1"],
        "final_loss": last["loss"],
        "final_roc_auc_macro": last["roc_auc_macro"],
        "rounds": cfg.num_rounds,
        "num_sites": 1,
        "wall_seconds": round(time.monotonic() - started, 2),
        "bytes_per_site_round": 0,
        "full_model_bytes": task.full_model_bytes(),
        "backbone": cfg.backbone,
        "policy": cfg.policy,
        "dataset": cfg.dataset,
        "mode": "centralized",
    }
    run.finish(summary)
    return summary
