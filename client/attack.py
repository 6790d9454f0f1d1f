"""Simulated attackers: what a malicious site sends, for robustness tests and measurements.

Only a *simulated* site attacks (a deployed site never does, whatever the run config
says, and the deployed ServerApp refuses such a run). The sites named in
``attack-sites`` (partition ids) train as usual, DP-SGD and its ledger included, and
then either train on poisoned labels or corrupt what they send, so the bad update
really travels through Flower to the server:

============== ==========================================================================
``sign-flip``  sends ``global - delta`` (``delta`` = trained - global): the update reversed
``scale``      sends ``global + attack-scale x delta`` (a negative scale is a scaled flip)
``label-flip`` trains on labels shifted by one class (``(y + 1) mod classes``)
``nan``        sends NaN in every value
``huge-count`` claims 10^9 training images (the weight FedAvg gives the update)
``wrong-shape`` sends its first array with one row too many
============== ==========================================================================
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import torch

from fedlens.shared.config import FedConfig, parse_attack_sites
from fedlens.shared.privacy import SiteUpdate
from fedlens.shared.task import LocalData

__all__ = ["attack_of", "poison_labels", "corrupt_update", "UPDATE_ATTACKS", "HUGE_COUNT"]

_log = logging.getLogger("fedlens.client.attack")

# What a huge-count attacker claims: a thousand times any real federation's sites.
HUGE_COUNT = 10**9

UpdateAttack = Callable[[SiteUpdate, dict[str, torch.Tensor], float], SiteUpdate]


def _sign_flip(update: SiteUpdate, received: dict[str, torch.Tensor], _scale: float) -> SiteUpdate:
    state, n, metrics = update
    return {k: received[k] - (v - received[k]) if v.is_floating_point() else v for k, v in state.items()}, n, metrics


def _scale(update: SiteUpdate, received: dict[str, torch.Tensor], scale: float) -> SiteUpdate:
    state, n, metrics = update
    return {k: received[k] + scale * (v - received[k]) if v.is_floating_point() else v for k, v in state.items()}, n, metrics


def _nan(update: SiteUpdate, _received: dict[str, torch.Tensor], _scale: float) -> SiteUpdate:
    state, n, metrics = update
    return {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}, n, metrics


def _huge_count(update: SiteUpdate, _received: dict[str, torch.Tensor], _scale: float) -> SiteUpdate:
    state, _n, metrics = update
    return state, HUGE_COUNT, metrics


def _wrong_shape(update: SiteUpdate, _received: dict[str, torch.Tensor], _scale: float) -> SiteUpdate:
    state, n, metrics = update
    first = next(iter(state))
    grown = torch.cat([state[first], state[first][:1]]) if state[first].dim() else state[first].reshape(1).repeat(2)
    return {**state, first: grown}, n, metrics


UPDATE_ATTACKS: dict[str, UpdateAttack] = {
    "sign-flip": _sign_flip,
    "scale": _scale,
    "nan": _nan,
    "huge-count": _huge_count,
    "wrong-shape": _wrong_shape,
}
"""Attacks on the sent update; ``label-flip`` poisons the training data instead (:func:`poison_labels`)."""


def attack_of(cfg: FedConfig, node_config: Mapping[str, object], *, simulated: bool) -> str:
    """The attack this site makes (``"none"`` for an honest site and for every deployed site)."""
    if not simulated or "partition-id" not in node_config:
        return "none"
    return parse_attack_sites(cfg.attack_sites, attack=cfg.attack).get(int(node_config["partition-id"]), "none")  # type: ignore[call-overload]


def poison_labels(data: LocalData) -> LocalData:
    """``data`` with every label moved to the next class (no label stays right)."""
    return LocalData(data.inputs, (data.labels + 1) % data.num_classes, data.start, data.num_classes)


def corrupt_update(kind: str, update: SiteUpdate, received: dict[str, torch.Tensor], *, scale: float, site: str) -> SiteUpdate:
    """What an attacking site sends instead of ``update`` (trained from ``received``)."""
    if kind not in UPDATE_ATTACKS:
        return update
    _log.warning("%s: simulated attack %r: sending a corrupted update", site, kind)
    return UPDATE_ATTACKS[kind](update, received, scale)
