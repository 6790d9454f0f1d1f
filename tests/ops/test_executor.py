"""A site's approvals: its own fedlens release's app by default, others only when a person approves them."""

from __future__ import annotations

import hashlib
import subprocess
import time

import pytest

from fedlens.ops.cli import main
from fedlens.ops.executor import APPROVALS_FILE, AppApprovals, StallGuard, default_app_hash
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


class _Arriving:
    """A SuperNode's object store as the executor sees it: objects arrive one by one, every ``every_s``."""

    def __init__(self, ids: list[str], every_s: float, *, missing: str | None = None) -> None:
        self.ids, self.every_s, self.missing = ids, every_s, missing
        self.started = time.monotonic()

    def __call__(self, object_id: str) -> bytes:
        from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

        arrived = int((time.monotonic() - self.started) / self.every_s)
        if object_id == self.missing or self.ids.index(object_id) >= arrived:
            raise ObjectUnavailableError(object_id)
        return object_id.encode()


def test_a_message_still_arriving_is_waited_for_past_the_stall_bound():
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    ids = [f"obj-{i}" for i in range(6)]
    started = time.monotonic()
    got = pull_objects(ids, StallGuard(_Arriving(ids, 0.25), stall_s=0.6), max_concurrent_pulls=6, initial_backoff=0.02, backoff_cap=0.05)
    assert got == {i: i.encode() for i in ids}
    assert time.monotonic() - started > 0.6 * 2  # the whole pull took longer than the bound: progress kept it going


def test_a_message_whose_content_stops_arriving_fails_after_the_stall_bound():
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, pull_objects

    ids = [f"obj-{i}" for i in range(4)]
    started = time.monotonic()
    with pytest.raises(ObjectPullError, match="nothing arrived from the SuperNode for"):
        pull_objects(ids, StallGuard(_Arriving(ids, 0.1, missing="obj-3"), stall_s=0.5), initial_backoff=0.02, backoff_cap=0.05)
    assert 0.5 <= time.monotonic() - started < 10
