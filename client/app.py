"""The fedlens ClientApp: train and evaluate handlers.

Each handler reads the config once, loads the site (cached per process), calls the
core and packs the reply. The trainable parameters are the only arrays exchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedlens.shared.checkpoint import GLOBAL_MODEL_FILE, read_checkpoint_meta, save_checkpoint
from fedlens.shared.config import FedConfig
from fedlens.shared.errors import FedlensError
from fedlens.shared.privacy import DPSGD, DPRequest, SiteRefusal, SiteUpdate, update_fingerprint
from fedlens.shared.privacy.budget import allows_evaluation, allows_non_private
from fedlens.shared.protocol import CLASSES, NUM_EXAMPLES, ROUND_OFFSET, RUN_ID, SITE_RECORD, UNIT_WEIGHT
from fedlens.shared.task import site_seed

from .attack import attack_of, corrupt_update, poison_labels
from .secagg import handle_secagg, is_secagg_message
from .site import Site, load_site, site_audit, site_privacy

__all__ = ["app", "build_client_app"]

_log = logging.getLogger("fedlens.client")


def _config(msg: Message) -> ConfigRecord:
    """The server's config of a train or evaluate message (round, run id, the federation's classes)."""
    return msg.content.config_records.get("config", ConfigRecord())


def _round(config: Mapping[str, object]) -> int:
    return int(config.get("server-round", 0)) + int(config.get(ROUND_OFFSET, 0))  # type: ignore[call-overload]


def _keep_global_model(site: Site, node_config: Mapping[str, object], *, run_id: str, round: int) -> None:
    # A deployed site keeps the last global model it received, so it can explain and use it on
    # its own images (`fedlens explain|predict --model STATE_DIR/global-model.safetensors`).
    state_dir = node_config.get("state-dir")
    if site.simulated or not state_dir:
        return
    path = Path(str(state_dir)) / GLOBAL_MODEL_FILE
    try:
        if path.is_file():
            kept = read_checkpoint_meta(path)
            if kept.get("run_id") == run_id and kept.get("round", -1) >= round:
                return  # already kept (the evaluate message of the previous round carried it)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(
            path,
            site.task.model.state_dict(),
            config=site.task.cfg.to_dict(),
            classes=list(site.classes),
            round=round,
            site=site.name,
            run_id=run_id,
        )
    except (OSError, FedlensError) as exc:  # a copy for explaining: never worth failing a round over
        _log.warning("%s: could not keep the global model in %s: %s", site.name, state_dir, exc)


# Fault injection for resilience tests and drills: sites named here fail every
# training round, as a crashed site would.
FAULT_ENV = "FEDLENS_INJECT_FAULT"


def _site_update(
    site: Site,
    state: dict[str, torch.Tensor],
    config: Mapping[str, object],
    *,
    node_config: dict[str, object],
    state_root: Path | None,
    flower_run: int,
) -> SiteUpdate:
    """One round of local training; under DP the site's :class:`SitePrivacy` owns the round.

    It re-sends a re-asked round, decides against the site's limits and budget before
    training, and records the round in the ledger (under its lock) and in the site's
    audit log before the update leaves. A non-private round (``dp = false``) is
    refused here unless the site allows it, and audited here at a deployed site.

    A simulated site named in ``attack-sites`` trains the same way (and spends the
    same privacy), on poisoned labels or followed by a corrupted update (:mod:`.attack`).
    """
    if site.name in os.environ.get(FAULT_ENV, "").split(","):
        raise RuntimeError(f"injected fault at {site.name} ({FAULT_ENV})")
    attack = attack_of(site.task.cfg, node_config, simulated=site.simulated)
    if attack == "label-flip":
        site = dataclasses.replace(site, train=poison_labels(site.train))
    update = _trained_update(site, state, config, node_config=node_config, state_root=state_root, flower_run=flower_run)
    return corrupt_update(attack, update, state, scale=site.task.cfg.attack_scale, site=site.name)


def _trained_update(
    site: Site,
    state: dict[str, torch.Tensor],
    config: Mapping[str, object],
    *,
    node_config: dict[str, object],
    state_root: Path | None,
    flower_run: int,
) -> SiteUpdate:
    cfg = site.task.cfg
    rnd = _round(config)
    run_id = str(config.get(RUN_ID, flower_run))
    if not cfg.dp:
        return _non_private_round(site, state, config, node_config=node_config, rnd=rnd, run_id=run_id)

    def train(dp: DPSGD) -> SiteUpdate:
        return _train_locally(site, state, config, node_config=node_config, rnd=rnd, run_id=run_id, dp=dp)

    privacy = site_privacy(site, node_config, state_root=state_root)
    return privacy.run_round(
        request=DPRequest.from_config(cfg, run_id), round=rnd, global_state=state, num_examples=len(site.train), train=train
    )


def _non_private_round(
    site: Site, state: dict[str, torch.Tensor], config: Mapping[str, object], *, node_config: dict[str, object], rnd: int, run_id: str
) -> SiteUpdate:
    """A ``dp = false`` round: refused unless the site allows non-private runs; audited at a site with a state folder."""
    audit = site_audit(site, node_config)
    if not site.simulated and not allows_non_private(node_config):
        refusal = SiteRefusal(
            f"{site.name} refuses to train without differential privacy (the run has dp = false); "
            "only a site started with allow-non-private=true joins non-private runs"
        )
        if audit is not None:
            audit.round(run_id=run_id, round=rnd, outcome="refused", reason=str(refusal), epsilon_after=None, bytes_sent=None, sha256=None)
        raise refusal
    try:
        update = _train_locally(site, state, config, node_config=node_config, rnd=rnd, run_id=run_id, dp=None)
    except Exception as exc:
        if audit is not None:
            reason = f"training failed: {type(exc).__name__}: {exc}"
            audit.round(run_id=run_id, round=rnd, outcome="failed", reason=reason, epsilon_after=None, bytes_sent=None, sha256=None)
        raise
    if audit is not None:
        size, sha256 = update_fingerprint(update[0])
        audit.round(
            run_id=run_id,
            round=rnd,
            outcome="trained",
            reason="dp = false: trained WITHOUT differential privacy (the site allows non-private runs)",
            epsilon_after=None,
            bytes_sent=size,
            sha256=sha256,
        )
    return update


def _train_locally(
    site: Site,
    state: dict[str, torch.Tensor],
    config: Mapping[str, object],
    *,
    node_config: Mapping[str, object],
    rnd: int,
    run_id: str,
    dp: DPSGD | None,
) -> SiteUpdate:
    cfg = site.task.cfg
    site.task.load_trainable(state)
    _keep_global_model(site, node_config, run_id=run_id, round=rnd - 1)
    stats = site.task.train(
        site.train,
        epochs=cfg.local_epochs,
        seed=site_seed(cfg.seed, rnd, site.name),
        lr=site.task.round_lr(rnd),
        proximal_mu=float(config.get("proximal-mu", 0.0)),  # type: ignore[arg-type]
        min_steps=cfg.local_steps if dp is None else 0,  # DP-SGD takes the steps its plan accounts for
        dp=dp,
        # DP noise comes from the site's own entropy unless the run asks to be repeatable
        # (then it is reported as not private: the server could rebuild the noise).
        dp_seed=site_seed(cfg.seed, rnd, site.name) + 7919 if cfg.dp_reproducible else None,
    )
    _log.info("%s round %d: train loss %.4f, accuracy %.4f, %d steps", site.name, rnd, stats.loss, stats.accuracy, stats.steps)
    metrics: dict[str, float] = {"dp": float(dp is not None), UNIT_WEIGHT: 1.0}
    if dp is None:
        # Loss, accuracy and timing of training are exact statistics of the training
        # images, not covered by DP-SGD: a private site keeps them to itself (it logs them).
        # A private round's accounting is added by SitePrivacy once it is recorded.
        metrics.update(
            {"train-loss": stats.loss, "train-accuracy": stats.accuracy, "train-seconds": stats.seconds, "train-steps": float(stats.steps)}
        )
    return site.task.trainable_state(), stats.num_examples, metrics


def _train(site: Site, msg: Message, node_config: dict[str, object], state_root: Path | None) -> Message:
    config = _config(msg)
    state, num_examples, metrics = _site_update(
        site,
        msg.content["arrays"].to_torch_state_dict(),
        config,
        node_config=node_config,
        state_root=state_root,
        flower_run=msg.metadata.run_id,
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "metrics": MetricRecord({NUM_EXAMPLES: num_examples, **metrics}),
            SITE_RECORD: ConfigRecord({"name": site.name}),
        }
    )
    return Message(content=content, reply_to=msg)


def _evaluate(site: Site, msg: Message, node_config: dict[str, object]) -> Message:
    if site.task.cfg.dp and not site.simulated and not allows_evaluation(node_config):
        # Held-out metrics are exact statistics of images DP-SGD does not cover, and the
        # server chooses the model they are computed on: a private site opts in.
        raise SiteRefusal(
            f"{site.name} does not release evaluation metrics of its held-out images (not covered by DP); "
            "start the site with allow-evaluation=true to allow it"
        )
    site.task.load_trainable(msg.content["arrays"].to_torch_state_dict())
    config = _config(msg)
    _keep_global_model(site, node_config, run_id=str(config.get(RUN_ID, msg.metadata.run_id)), round=_round(config))
    if len(site.eval) == 0:
        metrics = {NUM_EXAMPLES: 0, UNIT_WEIGHT: 1, "accuracy": 0.0, "loss": 0.0, "macro_f1": 0.0}
    else:
        report = site.task.evaluate(site.eval)
        metrics = {
            NUM_EXAMPLES: report.num_examples,
            UNIT_WEIGHT: 1,
            "accuracy": report.accuracy,
            "loss": report.loss,
            "macro_f1": report.macro_f1,
        }
    content = RecordDict({"metrics": MetricRecord(metrics), SITE_RECORD: ConfigRecord({"name": site.name})})
    return Message(content=content, reply_to=msg)


def build_client_app(cfg: FedConfig | None = None, *, state_root: str | Path | None = None) -> ClientApp:
    """A ClientApp; with ``cfg`` it ignores Flower's run config (local simulation).

    Parameters
    ----------
    cfg : FedConfig, optional
        Fixed config (the simulation runner); ``None`` reads Flower's run config.
    state_root : path-like, optional
        Simulation: simulated sites keep their privacy ledgers in
        ``state_root/<site>``. Default: the run folder's ``sites/`` (``out-dir``).
    """
    app = ClientApp()

    def site_for(context: Context, config: Mapping[str, object]) -> Site:
        """The site, with the federation's label set from the message's ``config``."""
        classes = config.get(CLASSES)
        label_set = [str(c) for c in classes] if isinstance(classes, list) else None
        return load_site(cfg or FedConfig.from_run_config(context.run_config), dict(context.node_config), classes=label_set)

    def root_for(context: Context) -> Path | None:
        if state_root is not None:
            if not Path(state_root).is_dir():  # a Ray node that does not mount the run folder
                raise FedlensError(
                    f"the run folder's {Path(state_root).name}/ ({state_root}) is not visible on the machine running this site; "
                    "on a Ray cluster, put the run folder on storage every node mounts at the same path"
                )
            return Path(state_root)
        if "out-dir" in context.run_config:  # flwr run: the ServerApp's run folder
            return Path(str(context.run_config["out-dir"])) / str(context.run_id) / "sites"
        return None

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if is_secagg_message(msg):  # secure aggregation: the legacy path, behind client.secagg

            def update(
                state: dict[str, torch.Tensor], config: dict[str, object]
            ) -> tuple[dict[str, torch.Tensor], int, dict[str, float], str]:
                site = site_for(context, config)
                out = _site_update(
                    site, state, config, node_config=dict(context.node_config), state_root=root_for(context), flower_run=context.run_id
                )
                return (*out, site.name)

            return handle_secagg(msg, context, update)

        config = _config(msg)

        def inner(msg: Message, context: Context) -> Message:
            return _train(site_for(context, config), msg, dict(context.node_config), root_for(context))

        if KEY_CLIPPING_NORM in config:  # central DP with site-side clipping
            return fixedclipping_mod(msg, context, inner)
        return inner(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return _evaluate(site_for(context, _config(msg)), msg, dict(context.node_config))

    return app


app = build_client_app()
