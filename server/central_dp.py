"""User-level (central) DP: Flower's fixed-clipping wrappers with Flower's RDP accountant.

Each round the sampled sites' model updates are clipped to ``central-clip``
(by the server, or by each site before sending) and the server adds Gaussian
noise of std ``central-noise x central-clip`` to their mean. Flower's accountant
composes every release and the wrapper refuses, *before* sending any training
message, a round that would take the run past ``central-epsilon``; the run then
stops cleanly with that reason. Sites are weighted equally (the sensitivity bound
of DP-FedAvg needs it), through a unit weight every site reports.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedlens.shared.config import FedConfig

__all__ = ["wrap_central_dp", "sampled_sites", "central_summary"]


def sampled_sites(cfg: FedConfig) -> int:
    """Sites Flower samples per training round (its own formula)."""
    return min(cfg.num_sites, max(int(cfg.num_sites * cfg.fraction_train), cfg.min_sites))


def wrap_central_dp(strategy: Strategy, cfg: FedConfig, *, rounds_done: int = 0) -> Strategy:
    """``strategy`` under Flower's fixed-clipping DP wrapper named by ``central-dp``.

    Parameters
    ----------
    strategy : Strategy
        A FedAvg-family strategy weighting by the unit weight.
    cfg : FedConfig
        Supplies ``central-*`` and the number of sites.
    rounds_done : int
        Releases already made by this run (a resumed server composes them first).
    """
    num_sampled = sampled_sites(cfg)
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=cfg.central_delta,
            population_size=cfg.num_sites,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            # Flower samples a fixed number of sites, not Poisson: no amplification is claimed.
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=cfg.central_epsilon,
        )
    )
    if rounds_done:
        event = GaussianPrivacyEvent(noise_multiplier=cfg.central_noise, sample_size=num_sampled, population_size=cfg.num_sites)
        accountant.compose(event, count=rounds_done)
    wrapper = DifferentialPrivacyServerSideFixedClipping if cfg.central_dp == "server" else DifferentialPrivacyClientSideFixedClipping
    return wrapper(
        strategy,
        noise_multiplier=cfg.central_noise,
        clipping_norm=cfg.central_clip,
        num_sampled_clients=num_sampled,
        accountant=accountant,
    )


def central_summary(strategy: Strategy | None, cfg: FedConfig) -> dict[str, Any] | None:
    """What the central accountant spent, for the run summary (None when off)."""
    if strategy is None or not hasattr(strategy, "privacy_spent"):
        return None
    spent = strategy.privacy_spent()
    return {
        "mode": cfg.central_dp,
        "epsilon": spent.epsilon if spent else 0.0,
        "delta": cfg.central_delta,
        "budget_epsilon": cfg.central_epsilon,
        "noise_multiplier": cfg.central_noise,
        "clip": cfg.central_clip,
        "releases": spent.num_releases if spent else 0,
        "sampled_sites": sampled_sites(cfg),
        "accountant": "rdp (Flower, no amplification)",
    }
