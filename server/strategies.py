"""Flower strategies by config name. Adding one means adding an entry here."""

from __future__ import annotations

from typing import Callable

from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, Strategy

from shared.config import FedConfig

__all__ = ["build_strategy", "STRATEGIES"]


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
    }


STRATEGIES: dict[str, Callable[[FedConfig], Strategy]] = {
    "fedavg": lambda cfg: FedAvg(**_sampling(cfg)),
    # FedProx only sends `proximal-mu`; the site applies the proximal step.
    "fedprox": lambda cfg: FedProx(**_sampling(cfg), proximal_mu=cfg.proximal_mu),
    "fedadam": lambda cfg: FedAdam(**_sampling(cfg), eta=cfg.server_lr, eta_l=cfg.lr),
    "fedyogi": lambda cfg: FedYogi(**_sampling(cfg), eta=cfg.server_lr, eta_l=cfg.lr),
    "fedmedian": lambda cfg: FedMedian(**_sampling(cfg)),
    "fedtrimmedavg": lambda cfg: FedTrimmedAvg(**_sampling(cfg), beta=cfg.trim_beta),
    "krum": lambda cfg: Krum(**_sampling(cfg), num_malicious_nodes=cfg.krum_byzantine),
}


def build_strategy(cfg: FedConfig) -> Strategy:
    """The Flower strategy named by ``cfg.strategy``, with the config's sampling."""
    return STRATEGIES[cfg.strategy](cfg)
