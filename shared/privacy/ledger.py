"""A site's privacy ledger: what each round spent, on disk, crash-safe.

The ledger is the site's own record. It is written atomically (temporary file,
fsync, rename) *before* the round's update leaves the site, so a crash or kill at
any point can lose at most an update that was never sent — never spent epsilon.

The ledger stores what it is told: the epsilon of an entry is the one
:func:`~.budget.plan_round` computed for the round from this ledger's history
(under :meth:`PrivacyLedger.lock`), so each round's epsilon is computed once.
:class:`~.site.SitePrivacy` is the one place that plans and records a round.

Format ``fedlens-privacy-ledger-v2`` adds to each entry the site's guarantee after
the round: every run's history composed in one accountant at the site's delta
(``site_epsilon``, ``site_delta``, ``site_accounting``). Ledgers written as
``fedlens-privacy-ledger-v1`` load unchanged (those fields are ``None`` for their
entries) and are written back as v2 at the next round; the composed guarantee of
their rounds is recomputed from their histories, which both formats keep.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import FedlensError
from ..io import atomic_write_json

__all__ = ["LedgerEntry", "PrivacyLedger", "LEDGER_FILE"]

LEDGER_FILE = "privacy-ledger.json"
_FORMAT = "fedlens-privacy-ledger-v2"
_READABLE = ("fedlens-privacy-ledger-v1", _FORMAT)


@dataclass(frozen=True)
class LedgerEntry:
    """One round of DP-SGD at one site."""

    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float  # cumulative for the run, after this round, at the run's delta with the run's accountant
    delta: float
    accountant: str
    time: float
    # v2: the site's guarantee after this round, all runs composed at the site's delta (None in v1 entries)
    site_epsilon: float | None = None
    site_delta: float | None = None
    site_accounting: str | None = None  # how the runs were composed, e.g. "rdp" or "max(prv,rdp)"


class PrivacyLedger:
    """The ledger file in ``state_dir``.

    Parameters
    ----------
    state_dir : path-like
        The site's state folder (created if missing).
    """

    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LEDGER_FILE

    def entries(self) -> list[LedgerEntry]:
        """All recorded rounds, oldest first.

        Raises
        ------
        FedlensError
            If the file exists but is not a ledger: never silently start afresh, that
            would reset spent epsilon.
        """
        if not self.path.is_file():
            return []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("format") not in _READABLE:
                raise ValueError(f"unknown format {data.get('format')!r}; this fedlens reads {', '.join(_READABLE)}")
            return [LedgerEntry(**e) for e in data["entries"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise FedlensError(
                f"privacy ledger {self.path} is unreadable ({exc}). It records the epsilon this site "
                "has spent, so fedlens will not train until it is restored from a backup or the "
                "site's privacy officer decides to retire it."
            ) from exc

    def history(self, run_id: str | None = None) -> list[tuple[float, float, int]]:
        """The ``(noise_multiplier, sample_rate, steps)`` history of one run, or of every run (``None``)."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries() if run_id is None or e.run_id == run_id]

    def spent(self, run_id: str) -> float:
        """Cumulative epsilon recorded for ``run_id`` (0 when none)."""
        runs = [e for e in self.entries() if e.run_id == run_id]
        return runs[-1].epsilon if runs else 0.0

    def record(
        self,
        *,
        run_id: str,
        round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        delta: float,
        accountant: str,
        epsilon: float,
        site_epsilon: float | None = None,
        site_delta: float | None = None,
        site_accounting: str | None = None,
    ) -> LedgerEntry:
        """Append one trained round.

        A round trained twice (a server that resumed and re-ran it) is recorded
        twice: the site really spent it twice.

        Parameters
        ----------
        run_id, round
            Which round of which run.
        noise_multiplier, sample_rate, steps, delta, accountant
            The mechanism the round ran and how it is accounted.
        epsilon : float
            The run's cumulative epsilon after this round, as planned from this ledger's
            history (:attr:`~.budget.RoundPlan.epsilon_after`), under :meth:`lock`.
        site_epsilon, site_delta, site_accounting : optional
            The site's guarantee after this round, every run composed
            (:attr:`~.budget.RoundPlan.site_epsilon_after` and its delta and accounting).
            ``None`` only for callers that do not compose (then the entry reads like v1).

        Raises
        ------
        FedlensError
            When ``epsilon`` (or ``site_epsilon``) is below what is already recorded: the
            plan was made from a stale history (outside :meth:`lock`); nothing is recorded then.
        """
        entries = self.entries()
        before = [e.epsilon for e in entries if e.run_id == run_id]
        stale = bool(before) and epsilon < before[-1] * (1 - 1e-9)
        composed = [
            e.site_epsilon
            for e in entries
            if e.site_epsilon is not None and e.site_delta == site_delta and e.site_accounting == site_accounting
        ]
        if site_epsilon is not None and composed and site_epsilon < composed[-1] * (1 - 1e-9):
            stale = True
        if stale:
            raise FedlensError(
                f"refusing to record round {round} of run {run_id!r} at epsilon {epsilon:.4f}: the ledger {self.path} "
                f"already records more ({before[-1] if before else 0.0:.4f} for that run"
                + (f", {composed[-1]:.4f} for the site" if composed else "")
                + "). The round was planned from an older history; "
                "plan and record under PrivacyLedger.lock() (SitePrivacy.run_round does)."
            )
        entry = LedgerEntry(
            run_id=run_id,
            round=round,
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
            epsilon=float(epsilon),
            delta=delta,
            accountant=accountant,
            time=time.time(),
            site_epsilon=None if site_epsilon is None else float(site_epsilon),
            site_delta=site_delta,
            site_accounting=site_accounting,
        )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {"format": _FORMAT, "entries": [asdict(e) for e in (*entries, entry)]})
        return entry

    def steps(self, run_id: str) -> int:
        """DP-SGD steps recorded for ``run_id`` over all its rounds."""
        return sum(e.steps for e in self.entries() if e.run_id == run_id)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the budget: hold it from the budget check to the ledger entry.

        Two runs (or processes) sharing a state directory would otherwise both pass
        the check and together overspend.
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".ledger.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "entries": [asdict(e) for e in self.entries()]}
