"""Simulated attackers: each kind changes what the site sends the way its name says, and only simulated sites attack."""

from __future__ import annotations

import math

import pytest
import torch

from fedlens.client.attack import HUGE_COUNT, UPDATE_ATTACKS, attack_of, corrupt_update, poison_labels
from fedlens.shared.config import ATTACKS, FedConfig
from fedlens.shared.task import LocalData


def _update() -> tuple[dict[str, torch.Tensor], tuple[dict[str, torch.Tensor], int, dict[str, float]]]:
    received = {"w": torch.ones(3, 2), "b": torch.zeros(3)}
    trained = {"w": torch.full((3, 2), 1.5), "b": torch.full((3,), -0.25)}
    return received, (trained, 120, {"dp": 1.0})


def test_every_attack_kind_is_implemented():
    assert set(UPDATE_ATTACKS) | {"none", "label-flip"} == set(ATTACKS)


@pytest.mark.parametrize("kind", sorted(UPDATE_ATTACKS))
def test_each_update_attack_changes_what_is_sent(kind):
    received, update = _update()
    state, n, metrics = corrupt_update(kind, update, received, scale=-4.0, site="site-1")
    delta = {k: state[k] - received[k] for k in received if state[k].shape == received[k].shape}
    if kind == "sign-flip":
        assert torch.equal(delta["w"], torch.full((3, 2), -0.5)) and torch.equal(delta["b"], torch.full((3,), 0.25))
    elif kind == "scale":
        assert torch.equal(delta["w"], torch.full((3, 2), -2.0))  # -4 x 0.5
    elif kind == "nan":
        assert all(math.isnan(float(v)) for t in state.values() for v in t.flatten())
    elif kind == "huge-count":
        assert n == HUGE_COUNT and torch.equal(state["w"], update[0]["w"])
    elif kind == "wrong-shape":
        assert state["w"].shape == (4, 2) and state["b"].shape == (3,)
    assert metrics == update[2]


def test_an_honest_site_sends_its_update_unchanged():
    received, update = _update()
    assert corrupt_update("none", update, received, scale=10.0, site="site-0") is update
    assert corrupt_update("label-flip", update, received, scale=10.0, site="site-0") is update  # it poisoned its labels instead


def test_label_flip_leaves_no_label_right():
    data = LocalData(torch.zeros(6, 1), torch.tensor([0, 1, 2, 3, 4, 9]), 0, 10)
    flipped = poison_labels(data)
    assert torch.equal(flipped.labels, torch.tensor([1, 2, 3, 4, 5, 0])) and flipped.inputs is data.inputs


def test_only_the_named_simulated_sites_attack():
    cfg = FedConfig.from_mapping({"num-sites": 4, "attack": "sign-flip", "attack-sites": "1,3=nan"})
    assert attack_of(cfg, {"partition-id": 1}, simulated=True) == "sign-flip"
    assert attack_of(cfg, {"partition-id": 3}, simulated=True) == "nan"
    assert attack_of(cfg, {"partition-id": 0}, simulated=True) == "none"
    # A deployed site never attacks, whatever the run config says.
    assert attack_of(cfg, {"partition-id": 1, "data-path": "/x"}, simulated=False) == "none"
