"""A site's approvals: its own fedlens release's app by default, others only when a person approves them."""

from __future__ import annotations

import hashlib
import subprocess

import pytest

from fedlens.ops.cli import main
from fedlens.ops.executor import APPROVALS_FILE, AppApprovals, default_app_hash
from fedlens.ops.fab import write_app
from fedlens.ops.procs import flower_bin, flower_env
from fedlens.shared.errors import FedlensError


def test_default_hash_is_the_hash_of_the_app_flower_builds_for_fedlens_run(tmp_path):
    folder = write_app(tmp_path / "app")
    proc = subprocess.run([flower_bin("flwr"), "build"], cwd=folder, env=flower_env(FLWR_HOME=str(tmp_path / "home")),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (fab,) = folder.glob("*.fab")
    assert hashlib.sha256(fab.read_bytes()).hexdigest() == default_app_hash()


def test_only_the_own_release_is_approved_until_a_person_approves_another(tmp_path):
    approvals = AppApprovals(tmp_path)
    other = hashlib.sha256(b"another build").hexdigest()
    assert approvals.is_approved(default_app_hash()) and not approvals.is_approved(other)
    assert main(["client", "approve", other.upper(), "--state-dir", str(tmp_path), "--note", "rebuilt from v0.2.0"]) == 0
    assert approvals.is_approved(other) and approvals.approved()[other]["note"] == "rebuilt from v0.2.0"
    assert approvals.is_approved(default_app_hash())


def test_bad_hashes_and_damaged_files_are_errors_not_silent_approvals(tmp_path):
    approvals = AppApprovals(tmp_path)
    with pytest.raises(FedlensError, match="64 hex digits"):
        approvals.approve("abc", by="me")
    (tmp_path / APPROVALS_FILE).write_text("{not json")
    with pytest.raises(FedlensError, match="unreadable"):
        approvals.is_approved(default_app_hash())
