"""The site's own budget: calibration once per run, refusals, caps the server cannot lift."""

from __future__ import annotations

import logging

import pytest

from fedlens.shared.config import DEFAULT_DELTA
from fedlens.shared.errors import ConfigError
from fedlens.shared.privacy import BudgetExceeded, DPRequest, PrivacyLedger, SiteBudget, epsilon_of, plan_round, site_guarantee

from .dp_requests import dp_request

N = 3200  # images at the site: q = 64 / 3200, 50 steps per round


def _run_rounds(ledger: PrivacyLedger, budget: SiteBudget, request: DPRequest, rounds: range) -> list[float]:
    spent = []
    for rnd in rounds:
        plan = plan_round(ledger, budget, request, num_examples=N)
        entry = plan.record(ledger, run_id=request.run_id, round=rnd)
        # The plan's epsilon is the run's whole history composed, as an independent recomputation gives it.
        assert entry.epsilon == pytest.approx(
            epsilon_of(ledger.history(request.run_id), delta=plan.delta, accountant=plan.accountant), rel=1e-9
        )
        spent.append(entry.epsilon)
    return spent


def test_planned_rounds_fit_and_use_most_of_the_target_then_the_site_refuses(tmp_path):
    ledger, budget = PrivacyLedger(tmp_path), SiteBudget(max_epsilon=3.0)
    spent = _run_rounds(ledger, budget, dp_request(), range(1, 6))
    assert spent == sorted(spent) and 0.9 * 3.0 <= spent[-1] <= 3.0
    before = ledger.path.read_bytes()
    with pytest.raises(BudgetExceeded, match="Nothing was trained"):
        plan_round(ledger, budget, dp_request(), num_examples=N)  # a 6th round does not fit
    assert ledger.path.read_bytes() == before  # a refusal records nothing


def test_noise_stays_fixed_for_the_run_across_restarts(tmp_path):
    _run_rounds(PrivacyLedger(tmp_path), SiteBudget(max_epsilon=3.0), dp_request(), range(1, 3))
    reopened = PrivacyLedger(tmp_path)  # a restarted site process
    plan = plan_round(reopened, SiteBudget(max_epsilon=3.0), dp_request(), num_examples=N)
    assert plan.dp.noise_multiplier == reopened.entries()[0].noise_multiplier
    assert plan.epsilon_after > reopened.spent("run-a")  # the history is carried, not reset


def test_the_server_cannot_raise_what_a_site_spends(tmp_path):
    ledger, budget = PrivacyLedger(tmp_path), SiteBudget(max_epsilon=1.0, delta=1e-6)
    greedy = dp_request(target_epsilon=50.0, delta=1e-2)
    spent = _run_rounds(ledger, budget, greedy, range(1, 6))
    assert spent[-1] <= 1.0  # calibrated to the site's cap, not the request
    assert ledger.entries()[-1].delta == 1e-6  # the stricter delta wins
    with pytest.raises(BudgetExceeded):
        plan_round(ledger, budget, greedy, num_examples=N)


def test_budget_spans_runs(tmp_path):
    ledger, budget = PrivacyLedger(tmp_path), SiteBudget(max_epsilon=4.0)
    first = _run_rounds(ledger, budget, dp_request("run-a"), range(1, 6))[-1]
    second = _run_rounds(ledger, budget, dp_request("run-b"), range(1, 6))[-1]
    # Both runs composed in one accountant at the site's delta stay within the budget (and well below the
    # sum of the two runs' epsilons, the old basic-composition bound).
    composed = site_guarantee(ledger.entries(), delta=budget.delta).epsilon
    assert ledger.entries()[-1].site_epsilon == pytest.approx(composed, rel=1e-9)
    assert max(first, second) < composed <= 4.0 < first + second
    # A run recorded under an earlier, larger budget: the site is now over its maximum.
    old = epsilon_of([(0.5, 0.02, 500)], delta=1e-5, accountant="rdp")
    ledger.record(run_id="run-old", round=1, noise_multiplier=0.5, sample_rate=0.02, steps=500, delta=1e-5, accountant="rdp", epsilon=old)
    with pytest.raises(BudgetExceeded, match="used up"):
        plan_round(ledger, budget, dp_request("run-c"), num_examples=N)


def test_node_config_budget_is_required_and_checked():
    with pytest.raises(ConfigError, match="max-epsilon"):
        SiteBudget.from_node_config({"state-dir": "/tmp/x"})
    with pytest.raises(ConfigError, match="delta"):
        SiteBudget.from_node_config({"max-epsilon": 3, "delta": 2})
    with pytest.raises(ConfigError, match="epsilon"):
        SiteBudget.from_node_config({"max-epsilon": 0})
    budget = SiteBudget.from_node_config({"max-epsilon": "2.5", "allow-non-private": "true"})
    assert budget == SiteBudget(max_epsilon=2.5, delta=DEFAULT_DELTA, allow_non_private=True)  # the documented default delta


def test_weak_delta_and_tiny_sites_are_warned_about(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fedlens.privacy.budget"):
        plan_round(PrivacyLedger(tmp_path), SiteBudget(max_epsilon=3.0, delta=0.5), dp_request(delta=0.01), num_examples=200)
    text = caplog.text
    assert "not below 1/n" in text and "noise will swamp" in text


def test_reported_epsilon_can_be_recomputed_from_the_ledger(tmp_path):
    ledger = PrivacyLedger(tmp_path)
    _run_rounds(ledger, SiteBudget(max_epsilon=3.0), dp_request(), range(1, 6))
    e = ledger.entries()[-1]
    total = [(e.noise_multiplier, e.sample_rate, ledger.steps("run-a"))]
    assert epsilon_of(total, delta=e.delta, accountant=e.accountant) == pytest.approx(e.epsilon, rel=1e-9)
