"""A site's training round outside Flower: its budget, its ledger, replays, refusals."""

from __future__ import annotations

import pytest
import torch

from fedlens.client.app import _site_update
from fedlens.client.site import load_site
from fedlens.shared.config import FedConfig
from fedlens.shared.errors import ConfigError
from fedlens.shared.privacy import BudgetExceeded, PrivacyLedger, SiteRefusal
from fedlens.shared.privacy.dpsgd import steps_per_epoch


@pytest.fixture
def deployed(image_folder, cache_dir, tmp_path):
    cfg = FedConfig.from_mapping(
        {
            "dataset": "folder",
            "data-path": str(image_folder),
            "image-size": 32,
            "batch-size": 4,
            "cache-dir": cache_dir,
            "site-eval-fraction": 0.0,
        }
    )
    node = {
        "data-path": str(image_folder),
        "site-name": "clinic-a",
        "max-epsilon": 50.0,
        "delta": 1e-3,
        "state-dir": str(tmp_path / "state"),
    }
    return cfg, node


def _round(cfg, node, state=None, rnd=1, **extra):
    site = load_site(cfg, node)
    state = state if state is not None else site.task.trainable_state()
    config = {"server-round": rnd, "run-id": "run-1", **extra}
    return site, _site_update(site, state, config, node_config=node, state_root=None, flower_run=0)


def test_a_round_is_recorded_before_its_update_is_returned(deployed, tmp_path):
    cfg, node = deployed
    site, (update, n, metrics) = _round(cfg, node)
    entries = PrivacyLedger(tmp_path / "state").entries()
    assert [e.round for e in entries] == [1] and entries[0].epsilon == metrics["epsilon"]
    assert metrics["dp"] == 1.0 and n == len(site.train) and set(update) == set(site.task.trainable_state())


def test_a_re_asked_round_is_re_sent_not_retrained(deployed, tmp_path):
    cfg, node = deployed
    start = load_site(cfg, node).task.trainable_state()
    _site, (first, _, m1) = _round(cfg, node, state=start)
    _, (again, _, m2) = _round(cfg, node, state=start)  # the server lost our reply and asks again
    assert len(PrivacyLedger(tmp_path / "state").entries()) == 1  # no second spend
    assert m2 == m1 and all(torch.equal(first[k], again[k]) for k in first)
    changed = {k: v + 0.01 for k, v in start.items()}  # a different global model is a new round of training
    _round(cfg, node, state=changed)
    assert len(PrivacyLedger(tmp_path / "state").entries()) == 2


def test_a_deployed_site_needs_its_own_budget_and_state_dir(deployed):
    cfg, node = deployed
    with pytest.raises(ConfigError, match="max-epsilon"):
        _round(cfg, {k: v for k, v in node.items() if k != "max-epsilon"})
    with pytest.raises(ConfigError, match="state-dir"):
        _round(cfg, {k: v for k, v in node.items() if k != "state-dir"})


def test_a_deployed_site_refuses_non_private_runs_unless_it_allows_them(deployed, tmp_path):
    cfg, node = deployed
    public = FedConfig.from_mapping({"dp": False}, base=cfg)
    with pytest.raises(SiteRefusal, match="without differential privacy"):
        _round(public, node)
    _site, (_update, _n, metrics) = _round(public, {**node, "allow-non-private": "true"})
    assert metrics["dp"] == 0.0 and not (tmp_path / "state" / "privacy-ledger.json").exists()


def test_the_server_cannot_lift_a_site_budget(deployed, tmp_path):
    cfg, node = deployed
    greedy = FedConfig.from_mapping({"target-epsilon": 1000.0, "num-rounds": 2}, base=cfg)
    small = {**node, "max-epsilon": 2.0}
    _round(greedy, small, rnd=1)
    _, (_u, _n, metrics) = _round(greedy, small, rnd=2)
    assert metrics["epsilon"] <= 2.0
    with pytest.raises(BudgetExceeded):
        _round(greedy, small, rnd=3)


def test_a_private_site_releases_held_out_metrics_only_if_it_opts_in(deployed):
    from fedlens.client.app import _evaluate

    cfg, node = deployed
    with pytest.raises(SiteRefusal, match="allow-evaluation"):
        _evaluate(load_site(cfg, node), None, node)  # refused before the message is even read


def test_every_round_the_site_trains_or_refuses_is_in_its_audit_log(deployed, tmp_path):
    from fedlens.shared.privacy import SiteAudit, update_fingerprint

    cfg, node = deployed
    start = load_site(cfg, node).task.trainable_state()
    _site, (update, _n, metrics) = _round(cfg, node, state=start)
    _round(cfg, node, state=start)  # re-asked
    public = FedConfig.from_mapping({"dp": False}, base=cfg)
    with pytest.raises(SiteRefusal):
        _round(public, node, rnd=2)
    _site, (plain, _n, _m) = _round(public, {**node, "allow-non-private": "true"}, rnd=3)

    trained, re_sent, refused, non_private = SiteAudit(tmp_path / "state").entries()
    assert (trained["outcome"], re_sent["outcome"], refused["outcome"], non_private["outcome"]) == (
        "trained",
        "re-sent",
        "refused",
        "trained",
    )
    assert (trained["bytes_sent"], trained["sha256"]) == update_fingerprint(update) == (re_sent["bytes_sent"], re_sent["sha256"])
    assert trained["run_epsilon"] == metrics["epsilon"] and trained["epsilon_after"] <= 50.0
    assert "without differential privacy" in refused["reason"] and refused["round"] == 2
    assert non_private["sha256"] == update_fingerprint(plain)[1] and non_private["epsilon_after"] is None
    assert "WITHOUT differential privacy" in non_private["reason"]


def test_local_steps_set_the_work_of_a_non_private_round_only(deployed, tmp_path):
    cfg, node = deployed  # 36 images, batch 4: 9 steps per pass
    public = FedConfig.from_mapping({"dp": False, "local-steps": 20}, base=cfg)
    _site, (_update, _n, metrics) = _round(public, {**node, "allow-non-private": "true"})
    assert metrics["train-steps"] == 20
    # Under DP-SGD a round stays local-epochs x int(1/q) Poisson steps: that is what is calibrated and accounted.
    site, _ = _round(FedConfig.from_mapping({"local-steps": 20}, base=cfg), node)
    entries = PrivacyLedger(tmp_path / "state").entries()
    assert [e.steps for e in entries] == [steps_per_epoch(cfg.batch_size / len(site.train))] != [20]
