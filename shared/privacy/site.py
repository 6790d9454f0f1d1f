"""One site's private round, start to finish: outbox, budget, DP-SGD, ledger, outbox.

A private round at a site is always the same steps, in this order, all under the
ledger's lock (two runs sharing a site cannot both pass the budget check and
together overspend):

1. the outbox: a round re-asked from the *same* global model is re-sent; that is
   post-processing of an update already paid for, so it costs no new privacy;
2. the plan (:func:`~.budget.plan_round`): does the round fit in the site's
   budget, with which noise, clipping and sampling; a refused round spends nothing;
3. training, handed the plan's :class:`~.dpsgd.DPSGD` mechanism;
4. the ledger entry, with the epsilons the plan computed (the run's, and the
   site's with every run composed), written only once training has returned: a
   round that fails spends nothing on record, except one stopped because its
   weights diverged (the site tells the server so, which is a release of the
   steps that ran: recorded as planned, an upper bound);
5. the audit log (:class:`~.audit.SiteAudit`): what happened to the round and the
   digest of the update that leaves (a re-sent or refused round is recorded too);
6. the outbox, so that a reply the server loses can be re-sent.

:class:`SitePrivacy` owns those steps, as Opacus' ``PrivacyEngine`` owns the life
of private training; callers hand it the training as a function of the mechanism
and never assemble the steps themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..errors import FedlensError, TrainingDiverged
from .audit import SiteAudit, update_fingerprint
from .budget import DPRequest, RoundPlan, SiteBudget, SiteRefusal, plan_round, site_guarantee
from .dpsgd import DPSGD
from .ledger import LedgerEntry, PrivacyLedger
from .outbox import UpdateOutbox, state_digest

__all__ = ["SitePrivacy", "SiteUpdate", "privacy_metrics"]

_log = logging.getLogger("fedlens.privacy.site")

SiteUpdate = tuple[dict[str, torch.Tensor], int, dict[str, float]]
"""What a site sends back for a round: trainable state, training images, metrics."""


def privacy_metrics(entry: LedgerEntry, *, run_steps: int) -> dict[str, float]:
    """The accounting a private site reports with its update (the server's run summary reads these keys).

    Parameters
    ----------
    entry : LedgerEntry
        The round's ledger entry.
    run_steps : int
        DP-SGD steps recorded for the run so far, this round included.
    """
    return {
        "epsilon": entry.epsilon,
        "delta": entry.delta,
        "noise-multiplier": entry.noise_multiplier,
        "sample-rate": entry.sample_rate,
        "dp-steps": float(run_steps),
    }


class SitePrivacy:
    """A site's privacy: its budget, its ledger, and the outbox of its last update.

    Parameters
    ----------
    budget : SiteBudget
        What the site allows (set by the site, never by the server).
    ledger : PrivacyLedger
        The site's ledger; the outbox and the audit log live in the same state folder.
    site : str
        The site's name, for messages and logs.

    Examples
    --------
    >>> privacy = SitePrivacy(budget, PrivacyLedger(state_dir), site="clinic-a")  # doctest: +SKIP
    >>> state, n, metrics = privacy.run_round(
    ...     request=request, round=3, global_state=global_state, num_examples=len(train_images),
    ...     train=lambda dp: train_locally(global_state, dp),
    ... )  # doctest: +SKIP
    """

    def __init__(self, budget: SiteBudget, ledger: PrivacyLedger, *, site: str) -> None:
        self.budget = budget
        self.ledger = ledger
        self.site = site
        self.outbox = UpdateOutbox(ledger.state_dir)
        self.audit = SiteAudit(ledger.state_dir)

    def __repr__(self) -> str:
        return f"SitePrivacy(site={self.site!r}, max_epsilon={self.budget.max_epsilon:g}, ledger={str(self.ledger.path)!r})"

    def run_round(
        self,
        *,
        request: DPRequest,
        round: int,
        global_state: dict[str, torch.Tensor],
        num_examples: int,
        train: Callable[[DPSGD], SiteUpdate],
    ) -> SiteUpdate:
        """One private round: re-send it, or plan it, train it, record it and keep it.

        Parameters
        ----------
        request : DPRequest
            The DP parameters the run asks for (the site caps them by its budget).
        round : int
            The round number (with any resumed server's offset).
        global_state : dict of str to Tensor
            The global model the round trains from; a re-asked round is recognised by it.
        num_examples : int
            Training images at the site (sets the sample rate).
        train : callable
            Trains from ``global_state`` with the given mechanism and returns
            ``(state, num_examples, metrics)``. Called at most once, under the ledger's lock.

        Returns
        -------
        SiteUpdate
            ``(state, num_examples, metrics)``; the metrics carry the round's accounting
            (:func:`privacy_metrics`). A re-asked round returns what was sent before.

        Raises
        ------
        SiteRefusal
            When the request breaks a site limit, or (:class:`~.budget.BudgetExceeded`)
            the round does not fit in the site's budget; nothing was trained or recorded
            in the ledger, and the audit log says why.
        TrainingDiverged
            When training stopped because the weights diverged: the round is recorded
            in the ledger as planned (its steps ran), nothing is sent or kept.
        Exception
            Whatever else ``train`` raises; the ledger and the outbox are then left unchanged.
        """
        run_id = request.run_id
        with self.ledger.lock():
            digest = state_digest(global_state)
            sent = self.outbox.get(run_id=run_id, round=round, digest=digest)
            if sent is not None:  # the server lost our reply: re-send it, at no new privacy cost
                _log.info("%s: round %d of run %s was already trained from this model; re-sending that update", self.site, round, run_id)
                size, sha256 = update_fingerprint(sent[0])
                self.audit.round(
                    run_id=run_id,
                    round=round,
                    outcome="re-sent",
                    reason="re-asked from the same global model: the update already sent, no new training or spend",
                    epsilon_after=self._site_epsilon(),
                    run_epsilon=sent[2].get("epsilon"),
                    bytes_sent=size,
                    sha256=sha256,
                )
                return sent
            # Decide before training: a refused round spends nothing.
            try:
                plan = plan_round(self.ledger, self.budget, request, num_examples=num_examples, site=self.site)
            except SiteRefusal as exc:
                self._record_unsent(run_id, round, "refused", str(exc))
                raise
            except Exception as exc:
                self._record_unsent(run_id, round, "failed", f"planning failed: {type(exc).__name__}: {exc}")
                raise
            try:
                state, trained, metrics = train(plan.dp)
            except TrainingDiverged as exc:
                self._record_diverged(plan, run_id, round, exc)
                raise
            except Exception as exc:
                _log.warning("%s: round %d of run %s failed during training; nothing recorded", self.site, round, run_id)
                self._record_unsent(run_id, round, "failed", f"training failed: {type(exc).__name__}: {exc}")
                raise
            # The ledger is on disk before the update leaves the site.
            try:
                entry = plan.record(self.ledger, run_id=run_id, round=round)
            except Exception as exc:
                self._record_unsent(run_id, round, "failed", f"recording the round failed: {type(exc).__name__}: {exc}")
                raise
            metrics = {**metrics, **privacy_metrics(entry, run_steps=self.ledger.steps(run_id))}
            _log.info(
                "%s: round %d of run %s recorded at epsilon %.3f (delta %g); the site's, all runs composed: %.3f of %g at delta %g",
                self.site,
                round,
                run_id,
                entry.epsilon,
                entry.delta,
                plan.site_epsilon_after,
                self.budget.max_epsilon,
                plan.site_delta,
            )
            size, sha256 = update_fingerprint(state)
            mechanism = f"noise multiplier {plan.dp.noise_multiplier:.4g}, {plan.steps} steps at sample rate {plan.dp.sample_rate:.4g}"
            self.audit.round(
                run_id=run_id,
                round=round,
                outcome="trained",
                reason="; ".join([mechanism, *plan.notes]),
                epsilon_after=plan.site_epsilon_after,
                run_epsilon=entry.epsilon,
                bytes_sent=size,
                sha256=sha256,
            )
            self.outbox.put(run_id=run_id, round=round, digest=digest, state=state, num_examples=trained, metrics=metrics)
            return state, trained, metrics

    def _record_diverged(self, plan: RoundPlan, run_id: str, round: int, exc: TrainingDiverged) -> None:
        """A round stopped because training diverged: its steps ran, so it is recorded as spent.

        The site stopped on its weights (DP-SGD's own outputs) and tells the server so: that
        decision is post-processing of the steps that ran, and the accountant must count
        them. The round is recorded as planned, an upper bound on what its first
        ``exc.steps`` steps spent; nothing is sent and nothing goes to the outbox.
        """
        note = "nothing spent"
        if exc.steps > 0:
            try:
                plan.record(self.ledger, run_id=run_id, round=round)
                note = f"recorded in the ledger as planned ({plan.steps} steps, an upper bound on what {exc.steps} spent)"
            except Exception as record_exc:
                note = f"recording the spent steps FAILED: {type(record_exc).__name__}: {record_exc}"
                _log.error("%s: round %d of run %s: %s", self.site, round, run_id, note)
        _log.warning("%s: round %d of run %s diverged after %d DP-SGD steps; %s", self.site, round, run_id, exc.steps, note)
        self._record_unsent(run_id, round, "failed", f"training diverged after {exc.steps} DP-SGD steps ({note}): {exc}")

    def _site_epsilon(self) -> float | None:
        """The site's epsilon so far, all runs composed at its delta (None if the ledger cannot be read)."""
        try:
            return site_guarantee(self.ledger.entries(), delta=self.budget.delta).epsilon
        except FedlensError:
            return None

    def _record_unsent(self, run_id: str, round: int, outcome: str, reason: str) -> None:
        """Audit a round that sends nothing; a failing audit write must not hide why the round stopped."""
        try:
            self.audit.round(
                run_id=run_id,
                round=round,
                outcome=outcome,
                reason=reason,
                epsilon_after=self._site_epsilon(),
                bytes_sent=None,
                sha256=None,
            )
        except OSError as exc:
            _log.error("%s: could not write round %d of run %s to the audit log %s: %s", self.site, round, run_id, self.audit.path, exc)
