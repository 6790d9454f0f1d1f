"""Flower strategies by config name. Adding one means adding an entry here."""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, Strategy

from fedlens.shared.config import FedConfig
from fedlens.shared.protocol import NUM_EXAMPLES, UNIT_WEIGHT

__all__ = ["build_strategy", "weight_key", "STRATEGIES"]


def _sampling(cfg: FedConfig) -> dict[str, object]:
    # Sites keep no evaluation images when site-eval-fraction = 0: skip site evaluation.
    fraction_evaluate = cfg.fraction_evaluate if cfg.site_eval_fraction > 0 else 0.0
    min_eval = cfg.min_sites if fraction_evaluate > 0 else 0
    return {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": fraction_evaluate,
        "min_train_nodes": cfg.min_sites,
        "min_evaluate_nodes": min_eval,
        "min_available_nodes": cfg.min_sites,
        "weighted_by_key": weight_key(cfg),
    }


def weight_key(cfg: FedConfig) -> str:
    """The reply metric updates are weighted by: each site's training images, or under central DP
    (which bounds each site's influence) a unit weight, so that sites count equally."""
    return UNIT_WEIGHT if cfg.central_dp != "off" else NUM_EXAMPLES


STRATEGIES: dict[str, Callable[[FedConfig], Strategy]] = {
    "fedavg": lambda cfg: FedAvg(**_sampling(cfg)),
    # Server momentum over the averaged updates (under DP-SGD it cost a point here: docs/privacy.md).
    "fedavgm": lambda cfg: FedAvgM(**_sampling(cfg), server_learning_rate=cfg.server_learning_rate(), server_momentum=cfg.server_momentum),
    # FedProx only sends `proximal-mu`; the site applies the proximal step.
    "fedprox": lambda cfg: FedProx(**_sampling(cfg), proximal_mu=cfg.proximal_mu),
    "fedadam": lambda cfg: FedAdam(**_sampling(cfg), eta=cfg.server_learning_rate(), eta_l=cfg.lr),
    "fedyogi": lambda cfg: FedYogi(**_sampling(cfg), eta=cfg.server_learning_rate(), eta_l=cfg.lr),
    "fedmedian": lambda cfg: FedMedian(**_sampling(cfg)),
    "fedtrimmedavg": lambda cfg: FedTrimmedAvg(**_sampling(cfg), beta=cfg.trim_beta),
    "krum": lambda cfg: Krum(**_sampling(cfg), num_malicious_nodes=cfg.krum_byzantine),
}


def build_strategy(cfg: FedConfig, *, rounds_done: int = 0) -> Strategy:
    """The Flower strategy named by ``cfg.strategy``, with the config's sampling.

    With ``central-dp`` it is wrapped in Flower's DP wrapper and accountant
    (``rounds_done`` releases already composed, for a resumed run).
    """
    strategy = STRATEGIES[cfg.strategy](cfg)
    if cfg.central_dp != "off":
        from .central_dp import wrap_central_dp

        strategy = wrap_central_dp(strategy, cfg, rounds_done=rounds_done)
    return strategy
