"""A real server and real sites as separate processes on loopback, TLS and site authentication on."""

from __future__ import annotations

import json
import math

import pytest

from shared.privacy import PrivacyLedger

from .conftest import SITES, Federation
from .procs import wait_for

pytestmark = pytest.mark.deployment


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def test_three_sites_two_rounds_over_tls(federation: Federation, tmp_path):
    for site in SITES:
        federation.start_site(site)
    wait_for(lambda: federation.online() == set(SITES), 90, "three sites online")
    out = tmp_path / "run"
    run = federation.start_run(out)
    assert run.wait(timeout=600) == 0, federation.procs.log("run")[-3000:]
    summary = _summary(out)
    assert summary["rounds"] == 2 and summary["sites"] == SITES
    assert 0.0 <= summary["final_accuracy"] <= 1.0 and math.isfinite(summary["final_loss"])
    assert summary["private"] and summary["privacy"]["max_site_epsilon"] <= 8.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(set(r["sites_train"]) == set(SITES) for r in records)
    for name in ("model.safetensors", "config.toml", "accuracy.png"):
        assert (out / name).is_file(), name
    for site in SITES:  # every site's ledger holds both rounds, at the site
        entries = PrivacyLedger(federation.root / "state" / site).entries()
        assert [e.round for e in entries] == [1, 2]
    log = federation.procs.log("run")
    assert "round 2/2" in log and "final accuracy" in log
