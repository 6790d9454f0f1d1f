"""Runs on one site compose in one accountant at the site's delta; `fedlens privacy show` reports that guarantee."""

from __future__ import annotations

import json

import pytest
import torch

from fedlens.shared.privacy import DPRequest, PrivacyLedger, SiteBudget, SitePrivacy, epsilon_of, site_guarantee
from fedlens.shared.privacy.accounting import _epsilon_kwargs

from .dp_requests import dp_request

N = 3200
SITE_DELTA = 1e-5


def _request(run_id: str, **kw) -> DPRequest:
    return dp_request(run_id, **{"delta": SITE_DELTA, **kw})


def _train(dp):
    return {"w": torch.randn(4)}, N, {"dp": 1.0}


def _run(privacy: SitePrivacy, request: DPRequest) -> None:
    for rnd in range(1, request.num_rounds + 1):
        privacy.run_round(request=request, round=rnd, global_state={"w": torch.full((4,), float(rnd))}, num_examples=N, train=_train)


def _opacus(history: list[tuple[float, float, int]], accountant: str, delta: float) -> float:
    """Opacus' own accountant, fed every round of every run directly (no fedlens code in between)."""
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = list(history)
    return float(acc.get_epsilon(delta, **_epsilon_kwargs(accountant)))


def _show_json(state_dir, capsys) -> dict:
    from fedlens.ops.cli import main

    capsys.readouterr()
    assert main(["privacy", "show", str(state_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_two_runs_compose_in_one_accountant_at_the_site_delta(tmp_path, capsys):
    budget = SiteBudget(max_epsilon=6.0, delta=SITE_DELTA)
    privacy = SitePrivacy(budget, PrivacyLedger(tmp_path), site="clinic-a")
    # run-a asks for a looser delta (the site's is used); run-b for a stricter one and a larger batch.
    _run(privacy, _request("run-a", delta=1e-3))
    _run(privacy, _request("run-b", delta=1e-7, batch_size=128, target_epsilon=2.0, num_rounds=4))

    entries = privacy.ledger.entries()
    assert {e.delta for e in entries if e.run_id == "run-a"} == {SITE_DELTA}
    assert {e.delta for e in entries if e.run_id == "run-b"} == {1e-7}
    every_round = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
    expected = _opacus(every_round, "rdp", SITE_DELTA)

    assert entries[-1].site_epsilon == pytest.approx(expected, rel=1e-9)
    assert entries[-1].site_delta == SITE_DELTA and entries[-1].site_accounting == "rdp"
    guarantee = site_guarantee(entries)
    assert guarantee.epsilon == pytest.approx(expected, rel=1e-9) and guarantee.delta == SITE_DELTA
    assert guarantee.runs == ("run-a", "run-b") and guarantee.steps == sum(e.steps for e in entries)
    # One guarantee at the site's delta, tighter than the old sum of the runs' epsilons at k x delta.
    run_a, run_b = privacy.ledger.spent("run-a"), privacy.ledger.spent("run-b")
    assert max(run_a, run_b) < expected < run_a + run_b
    # Each round's recorded site epsilon is the composition of everything up to it.
    for i, e in enumerate(entries):
        assert e.site_epsilon == pytest.approx(_opacus(every_round[: i + 1], "rdp", SITE_DELTA), rel=1e-9)

    shown = _show_json(tmp_path, capsys)
    assert shown["site"]["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert shown["site"]["delta"] == SITE_DELTA and shown["site"]["accounting"] == "rdp"
    assert "composed in one RDP accountant" in shown["site"]["composition"] and "2 run(s)" in shown["site"]["composition"]
    assert [e["run_id"] for e in shown["entries"]] == [e.run_id for e in entries]

    from fedlens.ops.cli import main

    assert main(["privacy", "show", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "site: epsilon" in table and f"at delta {SITE_DELTA:g}" in table and "composed" in table


def test_a_later_run_gets_the_noise_that_keeps_every_run_composed_within_the_budget(tmp_path):
    budget = SiteBudget(max_epsilon=3.5, delta=SITE_DELTA)
    privacy = SitePrivacy(budget, PrivacyLedger(tmp_path), site="clinic-a")
    _run(privacy, _request("run-a"))
    first_noise = privacy.ledger.entries()[0].noise_multiplier

    _run(privacy, _request("run-b"))  # asks for the same as run-a: alone it would fit, composed it would not

    entries = privacy.ledger.entries()
    second_noise = entries[-1].noise_multiplier
    assert second_noise > first_noise
    composed = _opacus([(e.noise_multiplier, e.sample_rate, e.steps) for e in entries], "rdp", SITE_DELTA)
    assert 0.98 * 3.5 <= composed <= 3.5  # the site's budget is used, not passed
    assert entries[-1].site_epsilon == pytest.approx(composed, rel=1e-9)
    audited = [r for r in privacy.audit.entries() if r["run_id"] == "run-b"]
    assert "so that every run composed stays within max-epsilon" in audited[0]["reason"]


def test_runs_accounted_with_different_accountants_compose_with_the_stricter(tmp_path, capsys):
    budget = SiteBudget(max_epsilon=8.0, delta=SITE_DELTA)
    privacy = SitePrivacy(budget, PrivacyLedger(tmp_path), site="clinic-a")
    _run(privacy, _request("run-rdp", num_rounds=2))
    _run(privacy, _request("run-prv", num_rounds=2, accountant="prv"))

    entries = privacy.ledger.entries()
    history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
    rdp, prv = _opacus(history, "rdp", SITE_DELTA), _opacus(history, "prv", SITE_DELTA)

    assert entries[-1].site_accounting == "max(prv,rdp)"
    assert entries[-1].site_epsilon == pytest.approx(max(rdp, prv), rel=1e-6)
    assert entries[-1].epsilon == pytest.approx(epsilon_of(history[2:], delta=SITE_DELTA, accountant="prv"), rel=1e-6)
    shown = _show_json(tmp_path, capsys)["site"]
    assert shown["accountants"] == ["prv", "rdp"] and "the larger epsilon counts" in shown["composition"]
    assert shown["epsilon"] == pytest.approx(max(rdp, prv), rel=1e-6)


def test_an_old_v1_ledger_loads_and_its_runs_count_in_the_composition(tmp_path, capsys):
    old_history = [(1.1, 0.02, 50), (1.1, 0.02, 50)]
    v1 = {
        "format": "fedlens-privacy-ledger-v1",
        "entries": [
            {
                "run_id": "run-old",
                "round": r,
                "noise_multiplier": 1.1,
                "sample_rate": 0.02,
                "steps": 50,
                "epsilon": epsilon_of(old_history[:r], delta=1e-6, accountant="rdp"),
                "delta": 1e-6,
                "accountant": "rdp",
                "time": 1700000000.0 + r,
            }
            for r in (1, 2)
        ],
    }
    ledger = PrivacyLedger(tmp_path)
    ledger.path.write_text(json.dumps(v1))

    old = ledger.entries()
    assert [e.round for e in old] == [1, 2] and all(e.site_epsilon is None for e in old)
    # No site delta on record: `privacy show` composes at the strictest delta the runs used, and says so.
    shown = _show_json(tmp_path, capsys)["site"]
    assert shown["delta"] == 1e-6 and "predates" in shown["delta_source"]
    assert shown["epsilon"] == pytest.approx(_opacus(old_history, "rdp", 1e-6), rel=1e-9)

    privacy = SitePrivacy(SiteBudget(max_epsilon=6.0, delta=SITE_DELTA), ledger, site="clinic-a")
    _run(privacy, _request("run-new", num_rounds=2))

    data = json.loads(ledger.path.read_text())
    assert data["format"] == "fedlens-privacy-ledger-v2"
    assert data["entries"][:2] == [{**e, "site_epsilon": None, "site_delta": None, "site_accounting": None} for e in v1["entries"]]
    entries = ledger.entries()
    everything = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
    assert entries[-1].site_epsilon == pytest.approx(_opacus(everything, "rdp", SITE_DELTA), rel=1e-9)
    assert _show_json(tmp_path, capsys)["site"]["delta"] == SITE_DELTA  # now the site's own, as recorded
