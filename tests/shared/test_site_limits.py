"""Hostile run configs against a site with max-epsilon 1: every one is refused or capped by the site itself."""

from __future__ import annotations

import math

import pytest
import torch

from fedlens.shared.privacy import (
    DPSGD,
    BudgetExceeded,
    DPRequest,
    PrivacyLedger,
    SiteBudget,
    SitePrivacy,
    SiteRefusal,
    epsilon_of,
    plan_round,
    refusals,
    site_guarantee,
)

from .dp_requests import dp_request

N = 3200  # training images at the site: q = 64 / 3200, 50 steps per round
SITE_DELTA = 1e-5


def _request(run_id: str = "run-x", **kw) -> DPRequest:
    return dp_request(run_id, **{"target_epsilon": 1.0, "delta": SITE_DELTA, **kw})


class _Training:
    """Stands in for local training: records the mechanism it was handed, returns a fixed update."""

    def __init__(self) -> None:
        self.mechanisms: list[DPSGD] = []

    def __call__(self, dp: DPSGD) -> tuple[dict[str, torch.Tensor], int, dict[str, float]]:
        self.mechanisms.append(dp)
        return {"w": torch.full((4,), float(len(self.mechanisms)))}, N, {"dp": 1.0}


def _site(tmp_path, **limits) -> SitePrivacy:
    return SitePrivacy(SiteBudget(max_epsilon=1.0, delta=SITE_DELTA, **limits), PrivacyLedger(tmp_path / "state"), site="clinic-a")


def _train_until_refused(privacy: SitePrivacy, request: DPRequest, *, max_rounds: int = 30) -> int:
    for rnd in range(1, max_rounds + 1):
        try:
            privacy.run_round(
                request=request, round=rnd, global_state={"w": torch.full((4,), float(rnd))}, num_examples=N, train=_Training()
            )
        except BudgetExceeded:
            return rnd - 1
    raise AssertionError(f"the site trained {max_rounds} rounds of {request} without refusing")


def _assert_ledger_within_the_site(privacy: SitePrivacy) -> None:
    entries = privacy.ledger.entries()
    assert entries, "nothing was trained"
    for e in entries:
        assert e.epsilon <= 1.0 and e.site_epsilon is not None and e.site_epsilon <= 1.0
        assert e.delta <= SITE_DELTA and e.site_delta == SITE_DELTA
    composed = site_guarantee(entries, delta=SITE_DELTA).epsilon
    assert composed <= 1.0 and composed == pytest.approx(entries[-1].site_epsilon, rel=1e-9)


HOSTILE = [
    pytest.param({"max_grad_norm": math.nan}, "max-grad-norm", id="clip-nan"),
    pytest.param({"max_grad_norm": math.inf}, "max-grad-norm", id="clip-inf"),
    pytest.param({"max_grad_norm": 0.0}, "max-grad-norm", id="clip-zero"),
    pytest.param({"max_grad_norm": -1.0}, "max-grad-norm", id="clip-negative"),
    pytest.param({"batch_size": N}, "batch-size", id="batch-equals-data"),
    pytest.param({"batch_size": 100 * N}, "batch-size", id="batch-beyond-data"),
    pytest.param({"batch_size": 0}, "batch-size", id="batch-zero"),
    pytest.param({"num_rounds": 0}, "num-rounds", id="rounds-zero"),
    pytest.param({"num_rounds": 10**9}, "num-rounds", id="rounds-absurd"),
    pytest.param({"local_epochs": 0}, "local-epochs", id="epochs-zero"),
    pytest.param({"local_epochs": 10**6}, "local-epochs", id="epochs-absurd"),
    pytest.param({"target_epsilon": math.nan}, "target-epsilon", id="epsilon-nan"),
    pytest.param({"target_epsilon": -3.0}, "target-epsilon", id="epsilon-negative"),
    pytest.param({"reproducible": True}, "dp-reproducible", id="seeded-noise"),
]


@pytest.mark.parametrize("hostile, setting", HOSTILE)
def test_settings_that_would_void_the_accounting_are_refused_before_training(tmp_path, hostile, setting):
    privacy, train = _site(tmp_path), _Training()

    with pytest.raises(SiteRefusal) as refused:
        privacy.run_round(request=_request(**hostile), round=1, global_state={"w": torch.zeros(4)}, num_examples=N, train=train)

    message = str(refused.value)
    # A refusal, not a fault: the server recognises it by the class name in the error reply.
    assert type(refused.value).__name__ == "SiteRefusal"
    assert f"`{setting}`" in message and "Nothing was trained" in message
    assert "accepts" in message or "allow-non-private=true" in message  # what the site allows instead
    assert train.mechanisms == [] and not privacy.ledger.path.exists()
    audited = privacy.audit.entries()[-1]
    assert audited["outcome"] == "refused" and f"`{setting}`" in audited["reason"] and audited["sha256"] is None


def test_refusals_answers_what_plan_round_raises():
    budget = SiteBudget(max_epsilon=1.0, delta=SITE_DELTA)
    assert refusals(budget, _request(), num_examples=N) == []
    problems = refusals(budget, _request(max_grad_norm=math.inf, batch_size=N, local_epochs=0), num_examples=N)
    assert [p.split(" = ")[0] for p in problems] == ["`max-grad-norm`", "`batch-size`", "`local-epochs`"]


def test_the_site_owns_its_limits_on_rounds_and_epochs(tmp_path):
    strict = SiteBudget(max_epsilon=1.0, delta=SITE_DELTA, max_rounds=10, max_local_epochs=2)
    with pytest.raises(SiteRefusal, match=r"`num-rounds` = 11: the site accepts 1 to 10"):
        plan_round(PrivacyLedger(tmp_path), strict, _request(num_rounds=11), num_examples=N)
    with pytest.raises(SiteRefusal, match=r"`local-epochs` = 3: the site accepts 1 to 2"):
        plan_round(PrivacyLedger(tmp_path), strict, _request(local_epochs=3), num_examples=N)
    assert plan_round(PrivacyLedger(tmp_path), strict, _request(num_rounds=10, local_epochs=2), num_examples=N).steps == 100


def test_seeded_noise_runs_only_where_the_site_allows_non_private_runs(tmp_path):
    privacy = _site(tmp_path, allow_non_private=True)
    privacy.run_round(request=_request(reproducible=True), round=1, global_state={"w": torch.zeros(4)}, num_examples=N, train=_Training())
    assert "dp-reproducible" in privacy.audit.entries()[-1]["reason"]  # trained, and the audit log says how
    _assert_ledger_within_the_site(privacy)


@pytest.mark.parametrize("target", [1000.0, math.inf])
def test_a_huge_target_epsilon_is_capped_to_the_site_budget(tmp_path, target):
    privacy = _site(tmp_path)
    plan = plan_round(privacy.ledger, privacy.budget, _request(target_epsilon=target), num_examples=N)
    assert any("capped to the site's max-epsilon 1" in note for note in plan.notes)
    # Calibrated to the site's budget, not the request's: the planned run ends just inside 1.
    planned = epsilon_of([(plan.dp.noise_multiplier, plan.dp.sample_rate, 5 * plan.steps)], delta=SITE_DELTA, accountant="rdp")
    assert 0.9 <= planned <= 1.0

    trained = _train_until_refused(privacy, _request(target_epsilon=target))

    assert trained == 5  # the planned rounds fit, the 6th does not
    _assert_ledger_within_the_site(privacy)
    assert privacy.ledger.entries()[-1].epsilon >= 0.9


@pytest.mark.parametrize("delta", [0.5, 1e-3, math.nan, 0.0, 2.0])
def test_a_looser_or_invalid_delta_is_replaced_by_the_site_delta(tmp_path, delta):
    privacy = _site(tmp_path)
    plan = plan_round(privacy.ledger, privacy.budget, _request(delta=delta), num_examples=N)
    assert plan.delta == SITE_DELTA and plan.site_delta == SITE_DELTA
    assert any("replaced by the site's" in note for note in plan.notes)
    _train_until_refused(privacy, _request(delta=delta, target_epsilon=1000.0))
    _assert_ledger_within_the_site(privacy)


def test_a_stricter_delta_is_kept_for_the_run(tmp_path):
    privacy = _site(tmp_path)
    plan = plan_round(privacy.ledger, privacy.budget, _request(delta=1e-8), num_examples=N)
    assert plan.delta == 1e-8 and plan.site_delta == SITE_DELTA  # the run is stated at its delta, the site at its own
    assert plan.site_epsilon_after < plan.epsilon_after  # the same history is a smaller epsilon at the looser delta


def test_noise_below_the_site_floor_is_raised_to_it(tmp_path):
    privacy = _site(tmp_path, min_noise_multiplier=3.0)
    plan = plan_round(privacy.ledger, privacy.budget, _request(target_epsilon=1000.0), num_examples=N)
    assert plan.dp.noise_multiplier == 3.0
    assert any("raised to the site's floor 3" in note for note in plan.notes)
    assert plan.epsilon_after == pytest.approx(epsilon_of([(3.0, 64 / N, 50)], delta=SITE_DELTA, accountant="rdp"))


def test_a_run_that_plans_one_round_and_asks_for_many_never_passes_the_budget(tmp_path):
    # The least noise a request can get: one planned round, a huge target, a loose delta. It then keeps asking.
    privacy = _site(tmp_path)
    greedy = _request(target_epsilon=1e6, delta=0.5, num_rounds=1, local_epochs=3)

    trained = _train_until_refused(privacy, greedy)

    assert trained == 1  # calibrated for one round: a second one would pass 1
    _assert_ledger_within_the_site(privacy)
    before = privacy.ledger.path.read_bytes()
    with pytest.raises(BudgetExceeded, match="Nothing was trained"):
        privacy.run_round(request=greedy, round=99, global_state={"w": torch.ones(4)}, num_examples=N, train=_Training())
    assert privacy.ledger.path.read_bytes() == before


def test_node_config_limits_are_read_and_checked():
    budget = SiteBudget.from_node_config({"max-epsilon": 1, "min-noise-multiplier": "0.8", "max-rounds": "40", "max-local-epochs": 3})
    assert (budget.min_noise_multiplier, budget.max_rounds, budget.max_local_epochs) == (0.8, 40, 3)
    for bad in ({"max-rounds": "0"}, {"max-local-epochs": "2.5"}, {"min-noise-multiplier": "nan"}, {"max-epsilon": "inf"}):
        with pytest.raises(Exception, match="max-rounds|max-local-epochs|min-noise-multiplier|max-epsilon|invalid"):
            SiteBudget.from_node_config({"max-epsilon": 1, **bad})


# The ClientApp's train handler: the settings it decides before SitePrivacy is even asked.


@pytest.fixture
def deployed(image_folder, cache_dir, tmp_path):
    from fedlens.shared.config import FedConfig

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
    node = {"data-path": str(image_folder), "site-name": "clinic-a", "max-epsilon": 1.0, "state-dir": str(tmp_path / "state")}
    return cfg, node


@pytest.mark.parametrize("hostile", [{"dp": False}, {"dp-reproducible": True}], ids=["dp-false", "dp-reproducible"])
def test_a_deployed_site_refuses_non_private_runs_in_its_train_handler(deployed, tmp_path, hostile):
    from fedlens.client.app import _site_update
    from fedlens.client.site import load_site
    from fedlens.shared.config import FedConfig
    from fedlens.shared.privacy import SiteAudit

    cfg, node = deployed
    site = load_site(FedConfig.from_mapping(hostile, base=cfg), node, classes=("alpha", "beta", "gamma"))
    with pytest.raises(SiteRefusal, match="allow-non-private=true"):
        _site_update(
            site, site.task.trainable_state(), {"server-round": 1, "run-id": "run-h"}, node_config=node, state_root=None, flower_run=0
        )
    assert not (tmp_path / "state" / "privacy-ledger.json").exists()
    (refused,) = SiteAudit(tmp_path / "state").entries()
    assert refused["outcome"] == "refused" and refused["run_id"] == "run-h" and refused["round"] == 1
