"""A site's training round outside Flower: its budget, its ledger, replays, refusals."""

from __future__ import annotations

import pytest
import torch

from fedlens.client.app import _site_update
from fedlens.client.site import load_site
from fedlens.shared.config import FedConfig
from fedlens.shared.data import LabelMismatch
from fedlens.shared.errors import ConfigError, DataError
from fedlens.shared.privacy import BudgetExceeded, PrivacyLedger, SiteRefusal
from fedlens.shared.privacy.dpsgd import steps_per_epoch
from fedlens.shared.task import Task

CLASSES = ("alpha", "beta", "gamma")  # the image_folder fixture's class folders


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


def _round(cfg, node, state=None, rnd=1, classes=CLASSES, **extra):
    site = load_site(cfg, node, classes=classes)
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
    start = load_site(cfg, node, classes=CLASSES).task.trainable_state()
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
    public = FedConfig.from_mapping({"dp": False, "lr": 0.001}, base=cfg)  # the DP-tuned lr 0.5 diverges without DP
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
        _evaluate(load_site(cfg, node, classes=CLASSES), None, node)  # refused before the message is even read


def test_every_round_the_site_trains_or_refuses_is_in_its_audit_log(deployed, tmp_path):
    from fedlens.shared.privacy import SiteAudit, update_fingerprint

    cfg, node = deployed
    start = load_site(cfg, node, classes=CLASSES).task.trainable_state()
    _site, (update, _n, metrics) = _round(cfg, node, state=start)
    _round(cfg, node, state=start)  # re-asked
    public = FedConfig.from_mapping({"dp": False, "lr": 0.001}, base=cfg)  # the DP-tuned lr 0.5 diverges without DP
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


def test_a_site_missing_classes_trains_the_federations_classifier(deployed, tmp_path):
    cfg, node = deployed
    federation = ("Delta", "alpha", "beta", "gamma")  # one class this site has no images of
    server = Task(cfg, len(federation)).trainable_state()
    site, (update, _n, _metrics) = _round(cfg, node, state=server, classes=federation)
    assert site.classes == federation and site.task.num_classes == 4
    assert {k: v.shape for k, v in update.items()} == {k: v.shape for k, v in server.items()}
    assert sorted(set(site.train.labels.tolist())) == [1, 2, 3]  # alpha, beta, gamma keep the federation's labels


def test_a_site_whose_folders_disagree_refuses_before_anything_is_spent(deployed, tmp_path):
    cfg, node = deployed
    with pytest.raises(LabelMismatch, match="clinic-a's data folder .* has the class 'gamma'"):
        _round(cfg, node, classes=("alpha", "beta", "pneumonia"))
    assert not (tmp_path / "state" / "privacy-ledger.json").exists()
    cmap = tmp_path / "map.toml"
    cmap.write_text('gamma = "ignore"\n')
    site, _reply = _round(cfg, {**node, "class-map": str(cmap)}, classes=("alpha", "beta", "pneumonia"))
    assert site.task.num_classes == 3 and 2 not in site.train.labels.tolist()
    assert len(PrivacyLedger(tmp_path / "state").entries()) == 1


def test_a_deployed_site_needs_the_servers_class_list(deployed):
    cfg, node = deployed
    with pytest.raises(DataError, match="sent no class list"):
        load_site(cfg, node)


def test_a_deployed_site_sets_its_own_pixel_limit(deployed):
    cfg, node = deployed
    # The run's config allows the fixture's 24 x 24 images; the site's own limit does not.
    with pytest.raises(DataError, match="0 readable images.*decompression bomb"):
        load_site(cfg, {**node, "max-image-pixels": 24 * 24 - 1}, classes=CLASSES)
    assert len(load_site(cfg, {**node, "max-image-pixels": 24 * 24}, classes=CLASSES).train) == 36


def test_a_round_whose_training_diverges_fails_with_the_cause_and_is_audited(deployed, tmp_path):
    from fedlens.shared.errors import TrainingDiverged
    from fedlens.shared.privacy import SiteAudit

    cfg, node = deployed
    exploding = FedConfig.from_mapping({"dp": False}, base=cfg)  # lr 0.5 with SGD, tuned for clipped gradients
    with pytest.raises(TrainingDiverged, match="`lr` = 0.5 with sgd") as err:
        _round(exploding, {**node, "allow-non-private": "true"})
    assert "--experiment non-private" in str(err.value)
    (failed,) = SiteAudit(tmp_path / "state").entries()
    assert failed["outcome"] == "failed" and "TrainingDiverged" in failed["reason"] and failed["sha256"] is None


def test_local_steps_set_the_work_of_a_non_private_round_only(deployed, tmp_path):
    cfg, node = deployed  # 36 images, batch 4: 9 steps per pass
    public = FedConfig.from_mapping({"dp": False, "local-steps": 20, "lr": 0.01}, base=cfg)  # the DP-tuned 0.5 diverges
    _site, (_update, _n, metrics) = _round(public, {**node, "allow-non-private": "true"})
    assert metrics["train-steps"] == 20
    # Under DP-SGD a round stays local-epochs x int(1/q) Poisson steps: that is what is calibrated and accounted.
    site, _ = _round(FedConfig.from_mapping({"local-steps": 20}, base=cfg), node)
    entries = PrivacyLedger(tmp_path / "state").entries()
    assert [e.steps for e in entries] == [steps_per_epoch(cfg.batch_size / len(site.train))] != [20]
