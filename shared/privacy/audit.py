"""A site's audit log: every run it saw and every round it trained, re-sent or refused.

The log is ``audit.jsonl`` in the site's state folder: one JSON object per line,
appended and fsynced, never rewritten. A crash can at worst leave a torn last line;
readers skip it (with a warning), and the next append starts on a fresh line, so
earlier lines are never touched. Several processes may append at once (the site's
executor records runs, its ClientApp records rounds): each append holds an exclusive
lock on the file and is one ``write``.

Records (every one has ``v`` = 1, ``kind`` and ``time``, UTC ISO 8601):

``kind = "run"`` (:meth:`SiteAudit.run_seen`), written by whatever decides whether
the site runs an app:
    ``run_id``, ``app_hash`` (the app's SHA-256), ``accepted`` (bool), ``reason``.

``kind = "round"`` (:meth:`SiteAudit.round`), written by the site's private round
(:class:`~.site.SitePrivacy`) and the ClientApp's train handler:
    ``run_id``, ``round``, ``outcome`` (one of :data:`ROUND_OUTCOMES`), ``reason``,
    ``epsilon_after`` (the site's epsilon after the round, every run composed at its
    delta; ``None`` for a round outside DP), ``run_epsilon`` (the run's own
    cumulative epsilon, as reported to the server, or ``None``), ``bytes_sent`` and
    ``sha256`` of the update that left the site (``None`` when nothing left).

The update's digest is :func:`~.outbox.state_digest` (SHA-256 over each tensor's
name, shape, dtype and bytes, in name order) and ``bytes_sent`` the size of those
tensors: a receiver recomputes both from the arrays it got.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import FedlensError
from .outbox import state_digest

__all__ = ["AUDIT_FILE", "ROUND_OUTCOMES", "SiteAudit", "update_fingerprint"]

_log = logging.getLogger("fedlens.privacy.audit")

AUDIT_FILE = "audit.jsonl"
_VERSION = 1

ROUND_OUTCOMES = ("trained", "re-sent", "refused", "failed")
"""``trained``: trained and sent; ``re-sent``: a re-asked round answered from the outbox
(no new training, no new spend); ``refused``: declined before training (budget or
limits); ``failed``: training or recording raised, nothing was sent."""


def update_fingerprint(state: dict[str, torch.Tensor]) -> tuple[int, str]:
    """``(bytes, sha256)`` of an update as a site sends it (see the module docs)."""
    size = sum(t.numel() * t.element_size() for t in state.values())
    return int(size), state_digest(state)


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class SiteAudit:
    """The append-only audit log in a site's state folder.

    Parameters
    ----------
    state_dir : path-like
        The site's state folder (created when the first record is written).

    Examples
    --------
    >>> audit = SiteAudit("/var/lib/fedlens")  # doctest: +SKIP
    >>> audit.run_seen(run_id="42", app_hash="ab12...", accepted=False, reason="app not approved")  # doctest: +SKIP
    >>> [r["kind"] for r in audit.entries()]  # doctest: +SKIP
    ['run']
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / AUDIT_FILE

    def __repr__(self) -> str:
        return f"SiteAudit({str(self.path)!r})"

    def run_seen(self, *, run_id: str, app_hash: str, accepted: bool, reason: str) -> dict[str, Any]:
        """Record a run the site was asked to join, and whether it did.

        Call it where the site decides whether to run an app (its executor), once per
        run and decision; the ClientApp records the rounds.

        Parameters
        ----------
        run_id : str
            The run's id as the site saw it.
        app_hash : str
            SHA-256 of the app (FAB) the run would execute.
        accepted : bool
            Whether the site runs it.
        reason : str
            Why, in words (e.g. "approved by alice on 2025-01-02", "app not approved").

        Returns
        -------
        dict
            The record as written.
        """
        return self._append({"kind": "run", "run_id": str(run_id), "app_hash": str(app_hash), "accepted": bool(accepted), "reason": reason})

    def round(
        self,
        *,
        run_id: str,
        round: int,
        outcome: str,
        reason: str,
        epsilon_after: float | None,
        bytes_sent: int | None,
        sha256: str | None,
        run_epsilon: float | None = None,
    ) -> dict[str, Any]:
        """Record one training round: trained, re-sent, refused or failed.

        Parameters
        ----------
        run_id, round
            Which round of which run.
        outcome : str
            One of :data:`ROUND_OUTCOMES`.
        reason : str
            Why: the refusal's message, what the site capped, or the error.
        epsilon_after : float or None
            The site's epsilon after the round, all runs composed at its delta
            (unchanged for a refused or re-sent round); ``None`` outside DP.
        bytes_sent, sha256 : int and str, or None
            Of the update that left the site (:func:`update_fingerprint`); ``None``
            exactly when nothing left (refused, failed).
        run_epsilon : float, optional
            The run's own cumulative epsilon, as the site reported it.

        Raises
        ------
        FedlensError
            For an unknown outcome, or a fingerprint that does not match the outcome.
        """
        if outcome not in ROUND_OUTCOMES:
            raise FedlensError(f"unknown round outcome {outcome!r}; use one of {', '.join(ROUND_OUTCOMES)}")
        sent = outcome in ("trained", "re-sent")
        if sent != (bytes_sent is not None and sha256 is not None):
            raise FedlensError(
                f"a {outcome!r} round must {'' if sent else 'not '}carry bytes_sent and sha256 of the update sent "
                f"(got {bytes_sent!r}, {sha256!r})"
            )
        for name, value in (("epsilon_after", epsilon_after), ("run_epsilon", run_epsilon)):
            if value is not None and not math.isfinite(value):
                raise FedlensError(f"{name} must be a finite number or None, got {value!r}")
        return self._append(
            {
                "kind": "round",
                "run_id": str(run_id),
                "round": int(round),
                "outcome": outcome,
                "reason": reason,
                "epsilon_after": None if epsilon_after is None else float(epsilon_after),
                "run_epsilon": None if run_epsilon is None else float(run_epsilon),
                "bytes_sent": None if bytes_sent is None else int(bytes_sent),
                "sha256": sha256,
            }
        )

    def _append(self, fields: dict[str, Any]) -> dict[str, Any]:
        record = {"v": _VERSION, "time": _now(), **fields}
        line = (json.dumps(record, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
        new = not self.path.exists()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    # A crash tore the last line: end it, so this record starts on its own line.
                    line = b"\n" + line
                os.write(fd, line)
                os.fsync(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        if new:  # the file's own entry in the folder must be durable too
            dir_fd = os.open(self.state_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return record

    def _scan(self) -> tuple[list[dict[str, Any]], list[int]]:
        if not self.path.is_file():
            return [], []
        records, bad = [], []
        with open(self.path, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                    if not isinstance(record, dict) or "kind" not in record:
                        raise ValueError("not an audit record")
                except ValueError:
                    bad.append(number)
                    continue
                records.append(record)
        return records, bad

    def entries(self) -> list[dict[str, Any]]:
        """Every readable record, oldest first.

        A line that does not parse (the torn end of a write a crash interrupted) is
        skipped with a warning naming it; :meth:`unreadable_lines` lists them.
        """
        records, bad = self._scan()
        if bad:
            _log.warning(
                "%s: skipped %d unreadable line(s) (line %s); a crash while writing leaves at most one per crash",
                self.path,
                len(bad),
                ", ".join(map(str, bad)),
            )
        return records

    def unreadable_lines(self) -> list[int]:
        """Line numbers (from 1) of the lines :meth:`entries` skips."""
        return self._scan()[1]
