"""Hostile run configs meet sites whose own code enforces their limits (real processes, TLS, auth)."""

from __future__ import annotations

import json

import pytest

from fedlens.ops.procs import wait_for
from fedlens.shared.privacy import PrivacyLedger

from .conftest import SITES, Federation

pytestmark = pytest.mark.deployment


def test_greedy_and_non_private_runs_are_capped_or_refused_at_the_sites(federation: Federation, tmp_path):
    sites = SITES[:2]
    for site in sites:
        federation.start_site(site, "--max-epsilon", "1")  # the site's own budget: epsilon 1 at delta 1e-5
    wait_for(lambda: federation.online() == set(sites), 90, "two sites online")

    # A run asking for epsilon 1000 at delta 0.5: each site caps both to its own limits.
    greedy = tmp_path / "greedy"
    run = federation.start_run(greedy, **{"num-rounds": 2, "target-epsilon": 1000.0, "delta": 0.5})
    assert run.wait(timeout=600) == 0, federation.procs.log("run")[-3000:]
    ledgers = {site: PrivacyLedger(federation.root / "state" / site) for site in sites}
    for ledger in ledgers.values():
        entries = ledger.entries()
        assert [e.round for e in entries] == [1, 2], entries
        assert all(e.epsilon <= 1.0 + 1e-9 and e.delta <= 1e-5 for e in entries), entries
    before = {site: ledger.entries() for site, ledger in ledgers.items()}

    # A run without DP: both sites refuse by name, and nothing is spent or trained.
    plain = tmp_path / "not-private"
    run = federation.start_run(plain, **{"num-rounds": 1, "dp": False})
    run.wait(timeout=600)
    summary = json.loads((plain / "summary.json").read_text())
    assert summary["rounds"] == 0 and not summary["private"]
    for site in sites:  # the run stops in round 1, naming every site's refusal
        assert f"{site} refuses to train without differential privacy" in summary["stopped_early"], summary
        assert "without differential privacy" in " ".join(summary["site_failures"][site]), summary["site_failures"]
        assert ledgers[site].entries() == before[site]
