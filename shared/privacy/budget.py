"""A site's own privacy budget, and the decision whether one more round fits in it.

The server *requests* DP parameters (target epsilon, delta, clipping bound, planned
rounds); the site *decides*. It calibrates the noise once per run for the planned
rounds, checks the round against its own maximum epsilon using the history in its
ledger, and refuses with :class:`BudgetExceeded` when the round would not fit.
Nothing in a request can raise what the site spends above its configured maximum:
the target is capped by the site's remaining budget, and the delta by its own.

Budgets span runs: epsilon spent in earlier runs recorded in the same ledger is
subtracted (basic composition, a safe upper bound).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..config import DEFAULT_DELTA
from ..errors import ConfigError, FedlensError
from .accounting import ACCOUNTANTS, calibrate_noise, check_privacy_params, epsilon_of
from .dpsgd import DPSGD, sample_rate_for, steps_per_epoch
from .ledger import LedgerEntry, PrivacyLedger

__all__ = ["SiteBudget", "DPRequest", "RoundPlan", "SiteRefusal", "BudgetExceeded", "plan_round", "spent_by_run"]

_log = logging.getLogger("fedlens.privacy.budget")


class SiteRefusal(FedlensError):
    """A site declines a round on privacy grounds (not a fault).

    The class name travels in the error reply; the server recognises refusals by it.
    """


class BudgetExceeded(SiteRefusal):
    """A site refuses a round that would take it past its privacy budget."""


@dataclass(frozen=True)
class SiteBudget:
    """What a site allows, set by the site (node config), never by the server.

    Parameters
    ----------
    max_epsilon : float
        Most epsilon this site's data may spend, over all runs in its ledger.
    delta : float
        Largest delta the site accepts; runs are accounted at ``min(requested, delta)``.
        Default :data:`~shared.config.DEFAULT_DELTA`, the same as a run's default
        ``delta``: a deliberate default, stricter than 1/n for any site large enough
        to train under DP.
    allow_non_private : bool
        Whether the site trains at all when a run asks for ``dp = false`` (default: no).
    """

    max_epsilon: float
    delta: float = DEFAULT_DELTA
    allow_non_private: bool = False

    def __post_init__(self) -> None:
        check_privacy_params(epsilon=self.max_epsilon, delta=self.delta)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteBudget:
        """Read ``max-epsilon``, ``delta`` and ``allow-non-private`` from a site's node config.

        ``delta`` defaults to :data:`~shared.config.DEFAULT_DELTA`; ``max-epsilon`` has
        no default.

        Raises
        ------
        ConfigError
            When ``max-epsilon`` is missing or a value is invalid.
        """
        if "max-epsilon" not in node_config:
            raise ConfigError(
                "this site has no privacy budget: give it one in its node config, e.g. "
                "--node-config \"max-epsilon=3.0 delta=1e-5 state-dir='/var/lib/fedlens'\""
            )
        try:
            return cls(
                max_epsilon=float(node_config["max-epsilon"]),
                delta=float(node_config.get("delta", DEFAULT_DELTA)),
                allow_non_private=allows_non_private(node_config),
            )
        except ValueError as exc:
            raise ConfigError(f"invalid privacy budget in the site's node config: {exc}") from exc


def allows_non_private(node_config: Mapping[str, Any]) -> bool:
    """Whether a site's node config lets it join ``dp = false`` runs (default: no)."""
    return str(node_config.get("allow-non-private", "false")).strip().lower() in ("1", "true", "yes")


def allows_evaluation(node_config: Mapping[str, Any]) -> bool:
    """Whether a private site releases metrics of its held-out images (default: no)."""
    return str(node_config.get("allow-evaluation", "false")).strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True, kw_only=True)
class DPRequest:
    """The DP parameters a run asks every site to use.

    Every privacy parameter is a required keyword (the accountant and the RNG too):
    build it from the run's config with :meth:`from_config`. Only ``mode``, which
    changes speed and not the guarantee, has a default.
    """

    run_id: str
    target_epsilon: float
    delta: float
    max_grad_norm: float
    num_rounds: int
    local_epochs: int
    batch_size: int
    accountant: str
    secure_rng: bool
    mode: str = "auto"

    def __post_init__(self) -> None:
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"unknown accountant {self.accountant!r}; use one of {', '.join(ACCOUNTANTS)}")

    @classmethod
    def from_config(cls, cfg: Any, run_id: str) -> DPRequest:
        """From a :class:`~shared.config.FedConfig` (duck-typed to keep this module light)."""
        return cls(
            run_id=run_id,
            target_epsilon=cfg.target_epsilon,
            delta=cfg.delta,
            max_grad_norm=cfg.max_grad_norm,
            num_rounds=cfg.num_rounds,
            local_epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            accountant=cfg.accountant,
            mode=cfg.dp_mode,
            secure_rng=cfg.secure_rng,
        )


@dataclass(frozen=True)
class RoundPlan:
    """One accepted round: the mechanism, its accounting, and the epsilon after it."""

    dp: DPSGD
    steps: int
    delta: float
    accountant: str
    epsilon_after: float  # the run's cumulative epsilon once this round is trained: what the ledger records
    budget_left: float  # the cap for this run, for messages


def spent_by_run(entries: list[LedgerEntry]) -> dict[str, float]:
    """Cumulative epsilon of every run in a ledger (its last entry)."""
    out: dict[str, float] = {}
    for e in entries:
        out[e.run_id] = e.epsilon
    return out


def plan_round(ledger: PrivacyLedger, budget: SiteBudget, request: DPRequest, *, num_examples: int, site: str = "site") -> RoundPlan:
    """Decide whether one more round of ``request`` fits in ``budget``.

    The plan holds the round's epsilon (computed here, once); it is only valid
    while ``ledger`` does not change, so plan, train and record under
    ``ledger.lock()``. :meth:`~.site.SitePrivacy.run_round` does exactly that.

    Parameters
    ----------
    ledger : PrivacyLedger
        The site's ledger: earlier runs' spending and this run's history.
    budget : SiteBudget
        What the site allows.
    request : DPRequest
        What the run asks for.
    num_examples : int
        Training images at the site (sets the sample rate).
    site : str
        The site's name, for messages.

    Returns
    -------
    RoundPlan
        The mechanism for the round and its accounting.

    Raises
    ------
    BudgetExceeded
        When it does not; nothing has been trained or recorded then.
    DataError
        When the site has no more images than one batch.
    """
    delta = min(request.delta, budget.delta)
    for warning in check_privacy_params(epsilon=request.target_epsilon, delta=delta, dataset_size=num_examples):
        _log.warning("%s: %s", site, warning)
    q = sample_rate_for(request.batch_size, num_examples)
    steps = request.local_epochs * steps_per_epoch(q)
    if steps < 10:
        _log.warning(
            "%s: only %d images, %d DP-SGD steps per round: noise will swamp the signal; pool more images per site or lower batch-size",
            site,
            num_examples,
            steps,
        )
    entries = ledger.entries()
    earlier = {run: eps for run, eps in spent_by_run(entries).items() if run != request.run_id}
    cap = budget.max_epsilon - sum(earlier.values())
    spent_note = f"{sum(earlier.values()):.3f} spent in {len(earlier)} earlier run(s)" if earlier else "nothing spent in earlier runs"
    if cap <= 0:
        raise BudgetExceeded(
            f"{site} refuses to train: its privacy budget (max-epsilon {budget.max_epsilon:g}) is used up "
            f"({spent_note}). Nothing was trained. Its data can only join more training if its privacy "
            f"officer raises max-epsilon (see `fedlens privacy show STATE_DIR`)."
        )
    mine = [e for e in entries if e.run_id == request.run_id]
    accountant = request.accountant
    if mine:  # noise, delta and accountant stay fixed for the whole run, also across restarts
        sigma, delta, accountant = mine[0].noise_multiplier, mine[0].delta, mine[0].accountant
    else:
        target = min(request.target_epsilon, cap)
        try:
            sigma = calibrate_noise(
                target_epsilon=target, delta=delta, sample_rate=q, steps=request.num_rounds * steps, accountant=accountant
            )
        except ValueError as exc:  # Opacus cannot reach the target (absurd epsilon/steps)
            if target < request.target_epsilon:  # it is the site's small remaining budget
                raise BudgetExceeded(
                    f"{site} refuses to train: only epsilon {target:.4f} is left of its budget ({spent_note}), "
                    f"too little for {request.num_rounds * steps} DP-SGD steps. Nothing was trained."
                ) from exc
            raise ConfigError(
                f"{site}: cannot calibrate DP noise for epsilon {target:g} over {request.num_rounds * steps} steps: {exc}"
            ) from exc
        if target < request.target_epsilon:
            _log.warning(
                "%s: run asks for epsilon %g but the site's budget leaves %.3f; calibrating to that", site, request.target_epsilon, target
            )
    history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in mine] + [(sigma, q, steps)]
    after = epsilon_of(history, delta=delta, accountant=accountant)
    if after > request.target_epsilon * (1 + 1e-9):
        _log.warning(
            "%s: this round takes the run past its requested epsilon (%.3f > %g): more rounds than "
            "planned (a re-run round or a longer run); still within the site's budget",
            site,
            after,
            request.target_epsilon,
        )
    if after > cap * (1 + 1e-9):
        raise BudgetExceeded(
            f"{site} refuses this round: it would bring the run's epsilon to {after:.3f}, past the site's "
            f"budget of {cap:.3f} (max-epsilon {budget.max_epsilon:g}, {spent_note}). Nothing was trained. "
            f"Plan fewer rounds or local epochs, or ask the site's privacy officer for a larger max-epsilon."
        )
    dp = DPSGD(
        noise_multiplier=sigma,
        max_grad_norm=request.max_grad_norm,
        sample_rate=q,
        expected_batch_size=request.batch_size,
        mode=request.mode,
        secure_rng=request.secure_rng,
    )
    return RoundPlan(dp=dp, steps=steps, delta=delta, accountant=accountant, epsilon_after=after, budget_left=cap)
