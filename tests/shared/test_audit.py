"""The site's audit log: append-only, crash-tolerant, and it hashes what the site sent."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch

from fedlens.shared.errors import FedlensError
from fedlens.shared.privacy import BudgetExceeded, DPRequest, PrivacyLedger, SiteAudit, SiteBudget, SitePrivacy, update_fingerprint
from fedlens.shared.privacy.outbox import state_digest

from .dp_requests import dp_request

N = 3200


def _request(**kw) -> DPRequest:
    return dp_request(**{"target_epsilon": 1.0, "num_rounds": 2, **kw})


def _round(audit: SiteAudit, rnd: int, outcome: str = "trained") -> dict:
    sent = outcome in ("trained", "re-sent")
    return audit.round(
        run_id="run-a",
        round=rnd,
        outcome=outcome,
        reason="test",
        epsilon_after=0.1 * rnd,
        bytes_sent=16 if sent else None,
        sha256="ab" * 32 if sent else None,
    )


def test_records_are_appended_and_earlier_lines_never_change(tmp_path):
    audit = SiteAudit(tmp_path / "state")
    audit.run_seen(run_id="run-a", app_hash="f" * 64, accepted=True, reason="the site's own release")
    _round(audit, 1)
    before = audit.path.read_bytes()

    _round(audit, 2, outcome="refused")
    SiteAudit(tmp_path / "state").run_seen(run_id="run-b", app_hash="0" * 64, accepted=False, reason="app not approved")

    after = audit.path.read_bytes()
    assert after.startswith(before)  # appended, never rewritten
    records = SiteAudit(tmp_path / "state").entries()  # survives reopening
    assert [(r["kind"], r.get("round"), r.get("outcome"), r.get("accepted")) for r in records] == [
        ("run", None, None, True),
        ("round", 1, "trained", None),
        ("round", 2, "refused", None),
        ("run", None, None, False),
    ]
    assert records[0]["app_hash"] == "f" * 64 and records[3]["reason"] == "app not approved"
    assert all(r["v"] == 1 and r["time"].endswith("Z") for r in records)
    assert all(line.startswith(b"{") for line in after.splitlines())  # one JSON object per line


def test_a_torn_last_line_is_skipped_when_reading_and_the_next_record_starts_a_new_line(tmp_path, caplog):
    audit = SiteAudit(tmp_path)
    _round(audit, 1)
    _round(audit, 2)
    whole = audit.path.read_bytes()
    last = whole.splitlines(keepends=True)[-1]
    audit.path.write_bytes(whole + last[: len(last) // 2])  # the process died halfway through writing round 3

    assert [r["round"] for r in audit.entries()] == [1, 2]
    assert audit.unreadable_lines() == [3] and "unreadable" in caplog.text

    _round(audit, 3)  # the site restarted and carried on

    assert audit.path.read_bytes().startswith(whole + last[: len(last) // 2])  # the torn bytes stay, untouched
    assert [r["round"] for r in audit.entries()] == [1, 2, 3]
    assert audit.unreadable_lines() == [3]


def test_what_the_site_sent_is_hashed_trained_re_sent_and_refused(tmp_path):
    privacy = SitePrivacy(SiteBudget(max_epsilon=1.0), PrivacyLedger(tmp_path), site="clinic-a")
    model = {"w": torch.zeros(3, 2)}

    def train(dp):
        return {"w": torch.arange(6, dtype=torch.float32).reshape(3, 2), "b": torch.ones(2, dtype=torch.float64)}, N, {"dp": 1.0}

    update, _n, metrics = privacy.run_round(request=_request(), round=1, global_state=model, num_examples=N, train=train)
    again, _n, _m = privacy.run_round(request=_request(), round=1, global_state=model, num_examples=N, train=train)  # re-asked

    trained, re_sent = privacy.audit.entries()
    assert trained["outcome"] == "trained" and re_sent["outcome"] == "re-sent"
    # The digest a receiver recomputes from the arrays it got, and their size in bytes.
    assert trained["sha256"] == state_digest(update) == re_sent["sha256"]
    assert trained["bytes_sent"] == 6 * 4 + 2 * 8 == re_sent["bytes_sent"]
    assert update_fingerprint(again) == (trained["bytes_sent"], trained["sha256"])
    entry = privacy.ledger.entries()[-1]
    assert trained["epsilon_after"] == entry.site_epsilon and trained["run_epsilon"] == entry.epsilon == metrics["epsilon"]
    assert re_sent["epsilon_after"] == pytest.approx(entry.site_epsilon) and len(privacy.ledger.entries()) == 1
    assert "noise multiplier" in trained["reason"] and "no new training" in re_sent["reason"]

    privacy.run_round(request=_request(), round=2, global_state={"w": torch.ones(3, 2)}, num_examples=N, train=train)
    with pytest.raises(BudgetExceeded):  # a third round does not fit the 2 planned within epsilon 1
        privacy.run_round(request=_request(), round=3, global_state={"w": torch.full((3, 2), 2.0)}, num_examples=N, train=train)
    refused = privacy.audit.entries()[-1]
    assert refused["outcome"] == "refused" and refused["round"] == 3 and "past the site's budget" in refused["reason"]
    assert refused["bytes_sent"] is None and refused["sha256"] is None
    assert refused["epsilon_after"] == pytest.approx(privacy.ledger.entries()[-1].site_epsilon)


def test_a_round_whose_training_fails_is_audited_as_failed(tmp_path):
    privacy = SitePrivacy(SiteBudget(max_epsilon=1.0), PrivacyLedger(tmp_path), site="clinic-a")

    def broken(dp):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        privacy.run_round(request=_request(), round=1, global_state={"w": torch.zeros(2)}, num_examples=N, train=broken)
    (failed,) = privacy.audit.entries()
    assert failed["outcome"] == "failed" and "out of memory" in failed["reason"] and failed["sha256"] is None


def test_records_must_say_what_was_sent_exactly_when_something_was(tmp_path):
    audit = SiteAudit(tmp_path)
    with pytest.raises(FedlensError, match="unknown round outcome"):
        audit.round(run_id="r", round=1, outcome="skipped", reason="", epsilon_after=None, bytes_sent=None, sha256=None)
    with pytest.raises(FedlensError, match="must carry bytes_sent and sha256"):
        audit.round(run_id="r", round=1, outcome="trained", reason="", epsilon_after=0.1, bytes_sent=None, sha256=None)
    with pytest.raises(FedlensError, match="must not carry"):
        audit.round(run_id="r", round=1, outcome="refused", reason="", epsilon_after=0.1, bytes_sent=8, sha256="ab")
    assert not audit.path.exists()


_APPENDER = """
import sys
from fedlens.shared.privacy import SiteAudit

audit = SiteAudit(sys.argv[1])
for i in range(40):
    audit.run_seen(run_id=f"{sys.argv[2]}-{i}", app_hash="a" * 64, accepted=True, reason="x" * 2000)
"""


def test_two_processes_appending_at_once_keep_every_line_whole(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(tmp_path), name]) for name in ("executor", "clientapp")]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    audit = SiteAudit(tmp_path)
    records = audit.entries()
    assert audit.unreadable_lines() == [] and len(records) == 80
    assert sorted(r["run_id"] for r in records) == sorted(f"{n}-{i}" for n in ("executor", "clientapp") for i in range(40))


def test_client_audit_command_prints_a_table_and_json(tmp_path, capsys):
    from fedlens.ops.audit_cli import add_audit_command

    audit = SiteAudit(tmp_path)
    audit.run_seen(run_id="run-a", app_hash="c0ffee" + "0" * 58, accepted=True, reason="approved by alice")
    _round(audit, 1)
    _round(audit, 2, outcome="refused")
    parser = argparse.ArgumentParser(prog="fedlens client")
    add_audit_command(parser.add_subparsers(dest="client_command", required=True))

    args = parser.parse_args(["audit", str(tmp_path)])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "outcome" in table and "sha256" in table and "approved by alice" in table
    assert "1 run(s) seen; rounds: 1 trained, 0 re-sent, 1 refused, 0 failed" in table

    args = parser.parse_args(["audit", str(tmp_path), "--json"])
    assert args.func(args) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["entries"] == audit.entries() and shown["unreadable_lines"] == []

    args = parser.parse_args(["audit", str(tmp_path / "nowhere")])
    with pytest.raises(FedlensError, match="no audit log"):
        args.func(args)
