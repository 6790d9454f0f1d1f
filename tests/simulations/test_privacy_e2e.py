"""Privacy end to end on the real simulation engine: summaries, ledgers, refusals, central DP."""

from __future__ import annotations

import json

import pytest

from fedlens.shared.config import FedConfig
from fedlens.shared.privacy import PrivacyLedger, epsilon_of
from fedlens.simulations.runner import simulate

pytestmark = pytest.mark.slow

TINY = {
    "num-sites": 2,
    "num-rounds": 2,
    "max-train-images": 600,
    "max-test-images": 200,
    "image-size": 32,
    "partition": "iid",
    "batch-size": 16,
    # The default lr 0.5 is tuned for Poisson batches of 256: with batches of 16 each step
    # carries 16x the noise, and the run diverges (and now stops) in round 1.
    "lr": 0.05,
    "target-epsilon": 3.0,
    "report-per-class": 0,
}


def _cfg(cache_dir: str, **extra) -> FedConfig:
    return FedConfig.from_mapping({**TINY, "cache-dir": cache_dir, **extra})


@pytest.fixture(scope="module")
def private_run(tmp_path_factory, request):
    """One private run shared by the tests below; site-1 has its own, smaller budget."""
    cache = str(tmp_path_factory.mktemp("cache"))
    out = tmp_path_factory.mktemp("private") / "run"
    summary = simulate(_cfg(cache, **{"site-budgets": "site-1=0.5"}), out)
    return out, summary, cache


def test_private_run_reports_per_site_epsilon_that_anyone_can_recompute(private_run):
    out, summary, _cache = private_run
    privacy = summary["privacy"]
    assert summary["private"] is True and privacy["private"] is True
    assert set(privacy["sites"]) == {"site-0", "site-1"}
    targets = {"site-0": 3.0, "site-1": 0.5}  # site-1's own budget is below the run's target
    for site, facts in privacy["sites"].items():
        # The run used most of each site's allowance, and never more.
        assert 0.9 * targets[site] <= facts["epsilon"] <= targets[site]
        history = [(facts["noise_multiplier"], facts["sample_rate"], facts["steps"])]
        assert epsilon_of(history, delta=facts["delta"], accountant="rdp") == pytest.approx(facts["epsilon"], rel=1e-9)
        # A second accountant (PRV, near-tight) agrees within the known RDP slack.
        prv = epsilon_of(history, delta=facts["delta"], accountant="prv")
        assert prv <= facts["epsilon"] <= 1.5 * prv
        entries = PrivacyLedger(out / "sites" / site).entries()
        assert [e.round for e in entries] == [1, 2]
        assert entries[-1].epsilon == facts["epsilon"] and sum(e.steps for e in entries) == facts["steps"]
    assert privacy["sites"]["site-1"]["noise_multiplier"] > privacy["sites"]["site-0"]["noise_multiplier"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    eps = [r["privacy"]["site_epsilon"]["site-0"] for r in records]
    assert eps[0] < eps[1]  # cumulative, carried across rounds
    assert "train-loss" not in records[0]["sites_train"]["site-0"]  # private sites keep it


def test_no_site_may_train_ends_the_run_cleanly_with_the_reason(private_run, tmp_path):
    import shutil

    source, _summary, _cache = private_run
    out = tmp_path / "run"
    shutil.copytree(source, out)
    # Noise was calibrated for 2 rounds; a resumed run asking for more must stop, not overspend.
    cfg_path = out / "config.toml"
    cfg_path.write_text(cfg_path.read_text().replace("num-rounds = 2", "num-rounds = 4"))
    (out / "status.json").write_text('{"status": "running"}')
    summary = simulate(FedConfig(), out, resume=True)
    assert "declined on privacy grounds" in summary["stopped_early"]
    assert summary["rounds"] == 2
    assert json.loads((out / "status.json").read_text())["status"] == "finished"
    run_id = (out / "run-id").read_text().strip()
    for site, cap in (("site-0", 3.0), ("site-1", 0.5)):
        assert PrivacyLedger(out / "sites" / site).spent(run_id) <= cap


def test_non_private_run_says_so(tmp_path, cache_dir, caplog):
    summary = simulate(_cfg(cache_dir, dp=False, **{"num-rounds": 1, "report-per-class": 1}), tmp_path / "run")
    assert summary["private"] is False
    assert "dp = false" in summary["privacy"]["reason"]
    assert not any((tmp_path / "run" / "sites").rglob("*"))  # no site kept a ledger
    assert "NOT differentially private" in caplog.text
    # The report's model card says so per site, too.
    assert "<td colspan=2>not private</td>" in (tmp_path / "run" / "report" / "report.html").read_text()


def _releases_within(budget: float, noise: float, sites: int, delta: float) -> int:
    """How many rounds Flower's accountant allows (computed independently of the run)."""
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    acc = RdpAccountant(PrivacyConfig(delta, sites, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION))
    event = GaussianPrivacyEvent(noise_multiplier=noise, sample_size=sites, population_size=sites)
    n = 0
    while not acc.would_exceed(event, max_epsilon=budget):
        acc.compose(event)
        n += 1
    return n


@pytest.mark.parametrize("mode", ["server", "client"])
def test_central_dp_stops_before_its_budget_is_exceeded(tmp_path, cache_dir, mode):
    allowed = _releases_within(2.5, 2.0, 2, 1e-3)
    assert 1 <= allowed < 3  # the budget ends the run early
    # Central noise of std 1 per value on 2 sites' tiny models leaves little but noise: the test is about the
    # accountant, so the divergence check, which would rightly stop this run, is off.
    summary = simulate(
        _cfg(cache_dir, **{"central-dp": mode, "central-noise": 2.0, "central-epsilon": 2.5, "num-rounds": 3, "divergence-factor": 0.0}),
        tmp_path / "run",
    )
    central = summary["privacy"]["central"]
    assert summary["rounds"] == allowed and "central privacy budget" in summary["stopped_early"]
    assert 0 < central["epsilon"] <= 2.5 and central["releases"] == allowed
    assert summary["private"] is True  # sample-level DP ran underneath


def test_secure_aggregation_run_is_complete_and_private(tmp_path, cache_dir):
    summary = simulate(_cfg(cache_dir, secagg=True, **{"num-sites": 3, "min-sites": 3}), tmp_path / "run")
    assert summary["rounds"] == 2 and summary["private"] is True
    assert summary["privacy"]["secure_aggregation"] is True
    assert set(summary["privacy"]["sites"]) == {"site-0", "site-1", "site-2"}
    assert 0.0 < summary["final_accuracy"] <= 1.0
