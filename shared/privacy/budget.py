"""A site's own privacy budget, and the decision whether one more round fits in it.

The server *requests* DP parameters (target epsilon, delta, clipping bound, batch,
planned rounds and epochs); the site *decides*. Before anything trains it refuses a
request whose settings would make the accounting meaningless (:func:`refusals`),
caps what it may cap (the target epsilon, the delta, the noise floor), calibrates
the noise once per run for the planned rounds, and checks the round against its own
maximum epsilon using the history in its ledger, refusing with
:class:`BudgetExceeded` when the round would not fit.

Budgets span runs: the histories of *all* runs in the site's ledger are composed in
one accountant at the site's delta (:func:`site_guarantee`), so after any number of
runs the site's guarantee is one (epsilon <= max-epsilon, delta) pair, not a sum of
epsilons at k x delta. When runs were accounted with different accountants, every
one of them composes the whole history and the largest epsilon counts (the stricter
bound): the run config cannot make the site's total look smaller.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import DEFAULT_DELTA
from ..errors import ConfigError, FedlensError
from .accounting import ACCOUNTANTS, calibrate_noise, calibrate_noise_after, check_privacy_params, composed_epsilon, epsilon_of
from .dpsgd import DPSGD, steps_per_epoch
from .ledger import LedgerEntry, PrivacyLedger

__all__ = [
    "BudgetExceeded",
    "DPRequest",
    "RoundPlan",
    "SiteBudget",
    "SiteGuarantee",
    "SiteRefusal",
    "plan_round",
    "refusals",
    "site_guarantee",
    "spent_by_run",
]

_log = logging.getLogger("fedlens.privacy.budget")

# 0.5: below it the Gaussian noise is smaller than half the clipping bound, and the
# claimed epsilon rests on a subsampled-RDP bound far from the regime it is tight in.
# Every run configuration fedlens ships calibrates to 0.8 or more (epsilon <= 8).
DEFAULT_MIN_NOISE_MULTIPLIER = 0.5
# 1000 rounds / 50 local epochs: far beyond any run that learns under DP (the noise per
# step grows with the planned steps); a request past them is a mistake or an attack.
DEFAULT_MAX_ROUNDS = 1000
DEFAULT_MAX_LOCAL_EPOCHS = 50


class SiteRefusal(FedlensError):
    """A site declines a round on privacy grounds (not a fault).

    The class name travels in the error reply; the server recognises refusals by it.
    """


class BudgetExceeded(SiteRefusal):
    """A site refuses a round that would take it past its privacy budget."""


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SiteBudget:
    """What a site allows, set by the site (node config), never by the server.

    Parameters
    ----------
    max_epsilon : float
        Most epsilon this site's data may spend, all runs in its ledger composed.
    delta : float
        The site's delta: its total guarantee is stated at it, and runs are accounted
        at ``min(requested, delta)``. Default :data:`~shared.config.DEFAULT_DELTA`, the
        same as a run's default ``delta``: a deliberate default, stricter than 1/n for
        any site large enough to train under DP.
    allow_non_private : bool
        Whether the site trains at all when a run asks for ``dp = false`` or for
        ``dp-reproducible = true`` (noise the server could rebuild); default: no.
    min_noise_multiplier : float
        Noise floor: a run calibrated to less noise trains with this much (it then
        spends less than it asked). Default :data:`DEFAULT_MIN_NOISE_MULTIPLIER`.
    max_rounds, max_local_epochs : int
        Most rounds a run may plan, and local epochs per round; longer requests are
        refused. Defaults :data:`DEFAULT_MAX_ROUNDS`, :data:`DEFAULT_MAX_LOCAL_EPOCHS`.
    """

    max_epsilon: float
    delta: float = DEFAULT_DELTA
    allow_non_private: bool = False
    min_noise_multiplier: float = DEFAULT_MIN_NOISE_MULTIPLIER
    max_rounds: int = DEFAULT_MAX_ROUNDS
    max_local_epochs: int = DEFAULT_MAX_LOCAL_EPOCHS

    def __post_init__(self) -> None:
        check_privacy_params(epsilon=self.max_epsilon, delta=self.delta)
        if not math.isfinite(self.max_epsilon):
            raise ConfigError(f"max-epsilon must be finite, got {self.max_epsilon}; typical budgets are 1 to 8")
        if not (math.isfinite(self.min_noise_multiplier) and self.min_noise_multiplier >= 0):
            raise ConfigError(f"min-noise-multiplier must be a finite number >= 0, got {self.min_noise_multiplier}")
        for key, value in (("max-rounds", self.max_rounds), ("max-local-epochs", self.max_local_epochs)):
            if not _is_count(value) or value < 1:
                raise ConfigError(f"{key} must be a whole number >= 1, got {value!r}")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteBudget:
        """Read the site's limits from its node config.

        Keys: ``max-epsilon`` (required), ``delta``, ``allow-non-private``,
        ``min-noise-multiplier``, ``max-rounds``, ``max-local-epochs`` (documented
        defaults: the class's).

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
                min_noise_multiplier=float(node_config.get("min-noise-multiplier", DEFAULT_MIN_NOISE_MULTIPLIER)),
                max_rounds=int(str(node_config.get("max-rounds", DEFAULT_MAX_ROUNDS))),
                max_local_epochs=int(str(node_config.get("max-local-epochs", DEFAULT_MAX_LOCAL_EPOCHS))),
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

    Every privacy parameter is a required keyword (the accountant, the RNG and whether
    the noise is seeded from the run config too): build it from the run's config with
    :meth:`from_config`. Only ``mode``, which changes speed and not the guarantee, has
    a default. Nothing here is trusted: :func:`plan_round` checks it against the site.
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
    reproducible: bool  # dp-reproducible: noise seeded from the run config, which the server knows
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
            reproducible=cfg.dp_reproducible,
        )


@dataclass(frozen=True)
class RoundPlan:
    """One accepted round: the mechanism, its accounting, and the epsilons after it."""

    dp: DPSGD
    steps: int
    delta: float
    accountant: str
    epsilon_after: float  # the run's cumulative epsilon once this round is trained: what the ledger records
    budget_left: float  # what the site's budget left before this round (max-epsilon minus the composed spend), for messages
    site_epsilon_after: float  # every run in the ledger and this round composed, at site_delta
    site_delta: float
    site_accounting: str  # e.g. "rdp", or "max(prv,rdp)" when runs used both
    notes: tuple[str, ...] = field(default=())  # what the site capped or allowed in the request, in words

    def record(self, ledger: PrivacyLedger, *, run_id: str, round: int) -> LedgerEntry:
        """Write this round to ``ledger`` with the epsilons computed when it was planned (once)."""
        return ledger.record(
            run_id=run_id,
            round=round,
            noise_multiplier=self.dp.noise_multiplier,
            sample_rate=self.dp.sample_rate,
            steps=self.steps,
            delta=self.delta,
            accountant=self.accountant,
            epsilon=self.epsilon_after,
            site_epsilon=self.site_epsilon_after,
            site_delta=self.site_delta,
            site_accounting=self.site_accounting,
        )


@dataclass(frozen=True)
class SiteGuarantee:
    """Everything a site has released, as one (epsilon, delta) guarantee.

    Attributes
    ----------
    epsilon : float
        Every run's DP-SGD history composed, at ``delta``.
    delta : float
        The site's delta.
    accountants : tuple of str
        The accountants that composed the history; ``epsilon`` is the largest of theirs.
    runs : tuple of str
        The runs composed, in ledger order.
    rounds, steps : int
        Ledger entries and DP-SGD steps composed.
    delta_source : str
        Where ``delta`` comes from, in words.
    """

    epsilon: float
    delta: float
    accountants: tuple[str, ...]
    runs: tuple[str, ...]
    rounds: int
    steps: int
    delta_source: str

    @property
    def accounting(self) -> str:
        """``"rdp"``, or ``"max(prv,rdp)"`` when several accountants composed the history."""
        return _accounting_name(self.accountants)

    def describe(self) -> str:
        """How the guarantee is composed, in one sentence."""
        if not self.runs:
            return f"nothing spent yet (delta {self.delta:g}, {self.delta_source})"
        how = (
            f"one {self.accountants[0].upper()} accountant"
            if len(self.accountants) == 1
            else f"each of the {' and '.join(a.upper() for a in self.accountants)} accountants (runs used several; the larger epsilon counts)"
        )
        return (
            f"epsilon {self.epsilon:.4f} at delta {self.delta:g}: the DP-SGD histories of all {len(self.runs)} run(s) "
            f"({self.rounds} rounds, {self.steps} steps) composed in {how}, at {self.delta_source}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "accounting": self.accounting,
            "accountants": list(self.accountants),
            "runs": list(self.runs),
            "rounds": self.rounds,
            "steps": self.steps,
            "delta_source": self.delta_source,
            "composition": self.describe(),
        }


def _accounting_name(accountants: Iterable[str]) -> str:
    names = sorted(set(accountants))
    return names[0] if len(names) == 1 else f"max({','.join(names)})"


def site_guarantee(entries: list[LedgerEntry], *, delta: float | None = None, accountant: str | None = None) -> SiteGuarantee:
    """The one guarantee of everything in a ledger: all runs composed at the site's delta.

    Parameters
    ----------
    entries : list of LedgerEntry
        The site's ledger (:meth:`PrivacyLedger.entries`), v1 entries included: their
        histories compose like any other.
    delta : float, optional
        The site's delta. Default: the last one the ledger records (v2 entries); for a
        ledger with none (v1 only), the strictest delta any run used, which states the
        guarantee conservatively.
    accountant : str, optional
        One more accountant to compose with (the next run's), besides those of the entries.

    Raises
    ------
    ConfigError
        For an empty ledger without ``delta``.
    """
    if delta is not None:
        source = "the site's delta"
    else:
        recorded = [e.site_delta for e in entries if e.site_delta is not None]
        if recorded:
            delta, source = recorded[-1], "the site's delta (as recorded with its last round)"
        elif entries:
            delta = min(e.delta for e in entries)
            source = "the strictest delta its runs used (this ledger predates recorded site deltas)"
        else:
            raise ConfigError("an empty ledger records no delta: pass the site's delta")
    accountants = {e.accountant for e in entries} | ({accountant} if accountant else set())
    history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
    runs = tuple(dict.fromkeys(e.run_id for e in entries))
    return SiteGuarantee(
        epsilon=composed_epsilon(history, delta=delta, accountants=accountants) if accountants else 0.0,
        delta=delta,
        accountants=tuple(sorted(accountants)),
        runs=runs,
        rounds=len(entries),
        steps=sum(e.steps for e in entries),
        delta_source=source,
    )


def spent_by_run(entries: list[LedgerEntry]) -> dict[str, float]:
    """Cumulative epsilon of every run in a ledger (its last entry), each at its own delta."""
    out: dict[str, float] = {}
    for e in entries:
        out[e.run_id] = e.epsilon
    return out


def refusals(budget: SiteBudget, request: DPRequest, *, num_examples: int) -> list[str]:
    """What in ``request`` the site refuses outright, one sentence per setting (empty: nothing).

    These are the settings that would make the accounting meaningless, or the run not
    private; what the site can cap instead (target epsilon, delta, noise floor) is not
    listed here. :func:`plan_round` raises :class:`SiteRefusal` with these.
    """
    out = []
    if request.reproducible and not budget.allow_non_private:
        out.append(
            "`dp-reproducible` = True seeds the DP noise from the run config, which the server knows and could use to "
            "rebuild and subtract the noise; the site counts such runs as non-private and joins them only when started "
            "with allow-non-private=true"
        )
    if not (isinstance(request.max_grad_norm, (int, float)) and math.isfinite(request.max_grad_norm) and request.max_grad_norm > 0):
        out.append(
            f"`max-grad-norm` = {request.max_grad_norm!r}: the site accepts a finite clipping bound > 0 "
            "(the noise is scaled by it; without a finite bound it bounds nothing)"
        )
    if not _is_count(request.batch_size) or not 1 <= request.batch_size < num_examples:
        out.append(
            f"`batch-size` = {request.batch_size!r} with {num_examples} training images here: the sample rate would be "
            f"{'>= 1' if _is_count(request.batch_size) and request.batch_size >= num_examples else 'undefined'} "
            f"(every image in every step, no subsampling to account for); the site accepts batch-size 1 to "
            f"{max(1, num_examples - 1)}, e.g. {max(1, num_examples // 8)}"
        )
    if not _is_count(request.num_rounds) or not 1 <= request.num_rounds <= budget.max_rounds:
        out.append(f"`num-rounds` = {request.num_rounds!r}: the site accepts 1 to {budget.max_rounds} planned rounds (its max-rounds)")
    if not _is_count(request.local_epochs) or not 1 <= request.local_epochs <= budget.max_local_epochs:
        out.append(
            f"`local-epochs` = {request.local_epochs!r}: the site accepts 1 to {budget.max_local_epochs} local epochs per round "
            "(its max-local-epochs)"
        )
    if not (isinstance(request.target_epsilon, (int, float)) and request.target_epsilon > 0):  # NaN fails too; +inf is capped
        out.append(
            f"`target-epsilon` = {request.target_epsilon!r}: the site accepts a target > 0 (a larger one than its budget is capped "
            f"to max-epsilon {budget.max_epsilon:g})"
        )
    return out


def _run_delta(request: DPRequest, budget: SiteBudget) -> float:
    """The stricter of the two; anything but a valid, stricter delta gets the site's."""
    requested = request.delta
    if isinstance(requested, (int, float)) and 0 < requested < budget.delta:
        return float(requested)
    return budget.delta


def plan_round(ledger: PrivacyLedger, budget: SiteBudget, request: DPRequest, *, num_examples: int, site: str = "site") -> RoundPlan:
    """Decide whether one more round of ``request`` fits in ``budget``.

    The plan holds the round's epsilons (computed here, once); it is only valid
    while ``ledger`` does not change, so plan, train and record under
    ``ledger.lock()``. :meth:`~.site.SitePrivacy.run_round` does exactly that.

    What the site enforces, whatever the request says:

    * refused (:class:`SiteRefusal`, naming the setting): see :func:`refusals`;
    * capped: ``target-epsilon`` to ``max-epsilon``, ``delta`` to the site's, the
      noise multiplier to at least ``min-noise-multiplier`` and, for a new run on a
      site that has spent part of its budget, to what keeps all runs composed within
      ``max-epsilon``;
    * refused (:class:`BudgetExceeded`): a round that would take the composed epsilon
      of all runs (or the run's own epsilon) past ``max-epsilon``.

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
    SiteRefusal
        When a setting is refused (:func:`refusals`) or no noise can meet the target;
        :class:`BudgetExceeded` when the round does not fit. Nothing has been trained
        or recorded then.
    """
    problems = refusals(budget, request, num_examples=num_examples)
    if problems:
        raise SiteRefusal(f"{site} refuses run {request.run_id}: " + "; ".join(problems) + ". Nothing was trained.")
    notes: list[str] = []
    if request.reproducible:  # allowed (refusals() let it through): say so wherever the round is reported
        notes.append("dp-reproducible: noise seeded from the run config, not private towards the server (the site allows non-private runs)")
    delta = _run_delta(request, budget)
    if delta != request.delta:
        notes.append(f"delta {request.delta!r} replaced by the site's {budget.delta:g}")
    for warning in check_privacy_params(epsilon=min(request.target_epsilon, budget.max_epsilon), delta=delta, dataset_size=num_examples):
        _log.warning("%s: %s", site, warning)
    q = request.batch_size / num_examples
    steps = request.local_epochs * steps_per_epoch(q)
    if steps < 10:
        _log.warning(
            "%s: only %d images, %d DP-SGD steps per round: noise will swamp the signal; pool more images per site or lower batch-size",
            site,
            num_examples,
            steps,
        )
    entries = ledger.entries()
    mine = [e for e in entries if e.run_id == request.run_id]
    accountant = mine[0].accountant if mine else request.accountant  # fixed for the whole run, also across restarts
    accountants = tuple(sorted({e.accountant for e in entries} | {accountant}))
    accounting = _accounting_name(accountants)
    # A site whose ledger holds only this run, accounted with one accountant at the site's delta: the composition
    # is the run's own accounting, already computed (and recorded) for its last round. Spare the accountants.
    alone = len(mine) == len(entries) and accountants == (accountant,) and (mine[0].delta if mine else delta) == budget.delta
    spent = (mine[-1].epsilon if mine else 0.0) if alone else site_guarantee(entries, delta=budget.delta, accountant=accountant).epsilon
    prior = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
    cap = budget.max_epsilon - spent
    runs = len({e.run_id for e in entries})
    spent_note = (
        f"epsilon {spent:.3f} spent, {runs} run(s) composed ({accounting}) at delta {budget.delta:g}" if entries else "nothing spent yet"
    )
    if cap <= budget.max_epsilon * 1e-9:
        raise BudgetExceeded(
            f"{site} refuses to train: its privacy budget (max-epsilon {budget.max_epsilon:g}) is used up "
            f"({spent_note}). Nothing was trained. Its data can only join more training if its privacy "
            f"officer raises max-epsilon (see `fedlens privacy show STATE_DIR`)."
        )
    if mine:  # noise and delta stay fixed for the whole run, also across restarts
        sigma, delta = mine[0].noise_multiplier, mine[0].delta
    else:
        sigma = _calibrate(
            budget,
            request,
            prior,
            delta=delta,
            accountant=accountant,
            accountants=accountants,
            q=q,
            steps=steps,
            site=site,
            notes=notes,
        )
    if sigma < budget.min_noise_multiplier:
        notes.append(f"noise multiplier {sigma:.3f} raised to the site's floor {budget.min_noise_multiplier:g}")
        _log.warning(
            "%s: the run's noise multiplier %.3f is below the site's floor (min-noise-multiplier %g); training with the floor",
            site,
            sigma,
            budget.min_noise_multiplier,
        )
        sigma = budget.min_noise_multiplier
    history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in mine] + [(sigma, q, steps)]
    after = epsilon_of(history, delta=delta, accountant=accountant)
    site_after = after if alone else composed_epsilon([*prior, (sigma, q, steps)], delta=budget.delta, accountants=accountants)
    if after > request.target_epsilon * (1 + 1e-9):
        _log.warning(
            "%s: this round takes the run past its requested epsilon (%.3f > %g): more rounds than "
            "planned (a re-run round or a longer run); still within the site's budget",
            site,
            after,
            request.target_epsilon,
        )
    # The composed epsilon is the budget; the run's own (at a delta possibly stricter than the site's) is held to
    # max-epsilon too, so no epsilon the site records or reports ever exceeds it.
    if max(site_after, after) > budget.max_epsilon * (1 + 1e-9):
        raise BudgetExceeded(
            f"{site} refuses this round: it would bring the site's epsilon, all runs composed, to {site_after:.3f} "
            f"at delta {budget.delta:g} and this run's to {after:.3f} at delta {delta:g}, past the site's budget "
            f"(max-epsilon {budget.max_epsilon:g}; {spent_note}). Nothing was trained. Plan fewer rounds or local "
            f"epochs, or ask the site's privacy officer for a larger max-epsilon."
        )
    dp = DPSGD(
        noise_multiplier=sigma,
        max_grad_norm=float(request.max_grad_norm),
        sample_rate=q,
        expected_batch_size=request.batch_size,
        mode=request.mode,
        secure_rng=request.secure_rng,
    )
    return RoundPlan(
        dp=dp,
        steps=steps,
        delta=delta,
        accountant=accountant,
        epsilon_after=after,
        budget_left=cap,
        site_epsilon_after=site_after,
        site_delta=budget.delta,
        site_accounting=accounting,
        notes=tuple(notes),
    )


def _calibrate(
    budget: SiteBudget,
    request: DPRequest,
    prior: list[tuple[float, float, int]],
    *,
    delta: float,
    accountant: str,
    accountants: tuple[str, ...],
    q: float,
    steps: int,
    site: str,
    notes: list[str],
) -> float:
    """A new run's noise: the run's own target (capped by max-epsilon), then the site's budget with every run composed."""
    planned = request.num_rounds * steps
    target = min(float(request.target_epsilon), budget.max_epsilon)
    if target < request.target_epsilon:
        notes.append(f"target-epsilon {request.target_epsilon:g} capped to the site's max-epsilon {budget.max_epsilon:g}")
    try:
        sigma = calibrate_noise(target_epsilon=target, delta=delta, sample_rate=q, steps=planned, accountant=accountant)
    except ValueError as exc:  # Opacus cannot reach the target (a tiny epsilon over many steps)
        raise SiteRefusal(
            f"{site} refuses run {request.run_id}: no noise multiplier gives `target-epsilon` = {target:g} over the "
            f"{planned} DP-SGD steps planned ({request.num_rounds} rounds x {steps}) ({exc}). Nothing was trained. "
            "Ask for a larger target-epsilon or plan fewer rounds."
        ) from exc
    if not prior:
        return sigma
    # Earlier runs spent part of the budget: the whole planned run, composed with them, must fit.
    if composed_epsilon([*prior, (sigma, q, planned)], delta=budget.delta, accountants=accountants) <= budget.max_epsilon:
        return sigma
    try:
        capped = calibrate_noise_after(
            prior, target_epsilon=budget.max_epsilon, delta=budget.delta, sample_rate=q, steps=planned, accountants=accountants, start=sigma
        )
    except ValueError as exc:
        raise BudgetExceeded(
            f"{site} refuses to train: too little of its budget is left (max-epsilon {budget.max_epsilon:g}, all runs composed) "
            f"for the {planned} DP-SGD steps run {request.run_id} plans ({exc}). Nothing was trained."
        ) from exc
    notes.append(f"noise multiplier raised from {sigma:.3f} to {capped:.3f} so that every run composed stays within max-epsilon")
    _log.warning(
        "%s: run %s asks for epsilon %g; with the site's earlier runs composed, its budget leaves room for noise %.3f "
        "(instead of %.3f); calibrating to that",
        site,
        request.run_id,
        request.target_epsilon,
        capped,
        sigma,
    )
    return capped
