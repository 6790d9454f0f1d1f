"""The fedlens ClientApp: train and evaluate handlers.

Each handler reads the config once, loads the site (cached per process), calls the
core and packs the reply. The trainable parameters are the only arrays exchanged.
"""

from __future__ import annotations

import os

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from shared.config import FedConfig
from shared.protocol import NUM_EXAMPLES, ROUND_OFFSET, SITE_RECORD
from shared.task import site_seed

from .site import Site, load_site

__all__ = ["app", "build_client_app"]



def _round(msg: Message) -> int:
    config = msg.content.config_records.get("config", ConfigRecord())
    return int(config.get("server-round", 0)) + int(config.get(ROUND_OFFSET, 0))


# Fault injection for resilience tests and drills: sites named here fail every
# training round, as a crashed site would.
FAULT_ENV = "FEDLENS_INJECT_FAULT"


def _train(site: Site, msg: Message) -> Message:
    if site.name in os.environ.get(FAULT_ENV, "").split(","):
        raise RuntimeError(f"injected fault at {site.name} ({FAULT_ENV})")
    cfg = site.task.cfg
    site.task.load_trainable(msg.content["arrays"].to_torch_state_dict())
    config = msg.content.config_records.get("config", ConfigRecord())
    seed = site_seed(cfg.seed, _round(msg), site.name)
    stats = site.task.train(
        site.train,
        epochs=cfg.local_epochs,
        seed=seed,
        lr=site.task.round_lr(_round(msg)),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: stats.num_examples,
            "train-loss": stats.loss,
            "train-accuracy": stats.accuracy,
            "train-seconds": stats.seconds,
        }
    )
    content = RecordDict(
        {"arrays": ArrayRecord(site.task.trainable_state()), "metrics": metrics, SITE_RECORD: ConfigRecord({"name": site.name})}
    )
    return Message(content=content, reply_to=msg)


def _evaluate(site: Site, msg: Message) -> Message:
    site.task.load_trainable(msg.content["arrays"].to_torch_state_dict())
    if len(site.eval) == 0:
        metrics = {NUM_EXAMPLES: 0, "accuracy": 0.0, "loss": 0.0, "macro_f1": 0.0}
    else:
        report = site.task.evaluate(site.eval)
        metrics = {NUM_EXAMPLES: report.num_examples, "accuracy": report.accuracy, "loss": report.loss, "macro_f1": report.macro_f1}
    content = RecordDict({"metrics": MetricRecord(metrics), SITE_RECORD: ConfigRecord({"name": site.name})})
    return Message(content=content, reply_to=msg)


def build_client_app(cfg: FedConfig | None = None) -> ClientApp:
    """A ClientApp; with ``cfg`` it ignores Flower's run config (local simulation)."""
    app = ClientApp()

    def site_for(context: Context) -> Site:
        return load_site(cfg or FedConfig.from_run_config(context.run_config), dict(context.node_config))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _train(site_for(context), msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return _evaluate(site_for(context), msg)

    return app


app = build_client_app()
