"""One site's private round, start to finish: outbox, budget, DP-SGD, ledger, outbox.

A private round at a site is always the same steps, in this order, all under the
ledger's lock (two runs sharing a site cannot both pass the budget check and
together overspend):

1. the outbox: a round re-asked from the *same* global model is re-sent; that is
   post-processing of an update already paid for, so it costs no new privacy;
2. the plan (:func:`~.budget.plan_round`): does the round fit in the site's
   budget, with which noise, clipping and sampling; a refused round spends nothing;
3. training, handed the plan's :class:`~.dpsgd.DPSGD` mechanism;
4. the ledger entry, with the epsilon the plan computed, written only once
   training has returned: a round that fails spends nothing on record;
5. the outbox, so that a reply the server loses can be re-sent.

:class:`SitePrivacy` owns those steps, as Opacus' ``PrivacyEngine`` owns the life
of private training; callers hand it the training as a function of the mechanism
and never assemble the steps themselves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .budget import DPRequest, SiteBudget, plan_round
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
        The site's ledger; the outbox lives in the same state folder.
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
        BudgetExceeded
            When the round does not fit in the site's budget; nothing was trained or recorded.
        Exception
            Whatever ``train`` raises; the ledger and the outbox are then left unchanged.
        """
        run_id = request.run_id
        with self.ledger.lock():
            digest = state_digest(global_state)
            sent = self.outbox.get(run_id=run_id, round=round, digest=digest)
            if sent is not None:  # the server lost our reply: re-send it, at no new privacy cost
                _log.info("%s: round %d of run %s was already trained from this model; re-sending that update", self.site, round, run_id)
                return sent
            # Decide before training: a refused round spends nothing.
            plan = plan_round(self.ledger, self.budget, request, num_examples=num_examples, site=self.site)
            try:
                state, trained, metrics = train(plan.dp)
            except Exception:
                _log.warning("%s: round %d of run %s failed during training; nothing recorded", self.site, round, run_id)
                raise
            # The ledger is on disk before the update leaves the site.
            entry = self.ledger.record(
                run_id=run_id,
                round=round,
                noise_multiplier=plan.dp.noise_multiplier,
                sample_rate=plan.dp.sample_rate,
                steps=plan.steps,
                delta=plan.delta,
                accountant=plan.accountant,
                epsilon=plan.epsilon_after,
            )
            metrics = {**metrics, **privacy_metrics(entry, run_steps=self.ledger.steps(run_id))}
            _log.info(
                "%s: round %d of run %s recorded at epsilon %.3f (delta %g, run budget %.3f)",
                self.site,
                round,
                run_id,
                entry.epsilon,
                entry.delta,
                plan.budget_left,
            )
            self.outbox.put(run_id=run_id, round=round, digest=digest, state=state, num_examples=trained, metrics=metrics)
            return state, trained, metrics
