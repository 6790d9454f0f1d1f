"""Privacy accounting for DP-SGD: noise calibration and epsilon from a step history.

A history is a list of ``(noise_multiplier, sample_rate, steps)`` tuples, one per
stretch of training with fixed parameters (e.g. one round). Opacus' accountants
compose it; carrying it across rounds is what makes the cumulative epsilon right
(a fresh accountant per round would report one round's epsilon forever).

The same holds across runs: a site composes the histories of *all* its runs in one
accountant (:func:`composed_epsilon`), at its own delta, instead of adding up each
run's epsilon and delta.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable

from ..config import ACCOUNTANTS, check_epsilon_delta
from ..errors import ConfigError

__all__ = [
    "ACCOUNTANTS",
    "calibrate_noise",
    "calibrate_noise_after",
    "check_privacy_params",
    "compact_history",
    "composed_epsilon",
    "epsilon_of",
]

History = Iterable[tuple[float, float, int]]

# Opacus' default RDP orders stop at 63; small noise multipliers (large epsilon)
# have their optimum above that, so the bound would be looser than it needs to be.
# Opacus' own ceiling for its noise search: past it, no noise fits the budget.
MAX_NOISE_MULTIPLIER = 2.0**20

RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [64, 80, 96, 128, 192, 256, 384, 512, 1024]


def _epsilon_kwargs(accountant: str) -> dict[str, object]:
    return {"alphas": RDP_ORDERS} if accountant == "rdp" else {}


def check_privacy_params(*, epsilon: float, delta: float, dataset_size: int | None = None) -> list[str]:
    """Validate a privacy budget; return warnings for weak-but-legal choices.

    Raises
    ------
    ConfigError
        For epsilon <= 0 or delta outside (0, 1).
    """
    check_epsilon_delta(epsilon=epsilon, delta=delta)
    warnings = []
    if dataset_size and delta >= 1.0 / dataset_size:
        warnings.append(
            f"delta = {delta:g} is not below 1/n = 1/{dataset_size}: the guarantee then allows "
            f"leaking whole records; use delta < {1.0 / dataset_size:.1e}"
        )
    return warnings


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Noise multiplier so that ``steps`` steps at ``sample_rate`` spend ``target_epsilon``.

    Calibrate once for the whole planned run (rounds x local steps) and keep the
    multiplier fixed: the run then ends just inside the target.

    Parameters
    ----------
    target_epsilon, delta : float
        The guarantee the whole run may spend.
    sample_rate : float
        Poisson sampling probability per step.
    steps : int
        DP-SGD steps of the whole planned run.
    accountant : str
        One of :data:`ACCOUNTANTS`; the run must be accounted with the same one.
    """
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant {accountant!r}; use one of {', '.join(ACCOUNTANTS)}")
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ConfigError(f"a private run needs at least one step, got {steps}")
    check_privacy_params(epsilon=target_epsilon, delta=delta)
    return _calibrate(float(target_epsilon), float(delta), float(sample_rate), int(steps), accountant)


@functools.lru_cache(maxsize=256)
def _calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    # A pure function of its arguments, and a slow one for small sites (a binary search over
    # the accountant, seconds at sample rates near 0.3): a process that serves many simulated
    # sites of the same size calibrates once for all of them.
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        # The search probes very large noise multipliers, whose best RDP order lies past the
        # last one; Opacus warns about each probe. The epsilon of the multiplier it returns
        # is computed (and warned about, if need be) by epsilon_of.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            **_epsilon_kwargs(accountant),
        )
    return float(sigma)


def compact_history(history: History) -> list[tuple[float, float, int]]:
    """Merge the stretches that share a noise multiplier and sample rate, summing their steps.

    Composition does not depend on order, so the epsilon is the same; the accountants'
    cost grows with the number of stretches (one per round), not with the steps.
    Stretches with no steps are dropped.
    """
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        if int(n) > 0:
            key = (float(sigma), float(q))
            merged[key] = merged.get(key, 0) + int(n)
    return [(sigma, q, n) for (sigma, q), n in merged.items()]


def epsilon_of(history: History, *, delta: float, accountant: str) -> float:
    """Cumulative epsilon of a training history (0 for an empty one).

    Parameters
    ----------
    history : iterable of (noise_multiplier, sample_rate, steps)
        Every stretch of DP-SGD the run has done.
    delta : float
        The delta the epsilon is stated at.
    accountant : str
        One of :data:`ACCOUNTANTS` (no default: a run is accounted with the one it was calibrated with).
    """
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant {accountant!r}; use one of {', '.join(ACCOUNTANTS)}")
    steps = compact_history(history)
    if not steps:
        return 0.0
    from opacus.accountants import create_accountant

    acc = create_accountant(accountant)
    acc.history = steps
    return float(acc.get_epsilon(delta, **_epsilon_kwargs(accountant)))


def composed_epsilon(history: History, *, delta: float, accountants: Iterable[str]) -> float:
    """Epsilon of a whole history composed in one accountant, the stricter bound when several apply.

    A site's runs may have been accounted with different accountants (the run config
    chooses one). Every accountant in ``accountants`` composes the *whole* history (all
    runs together), and the largest epsilon is returned: no run can make the site's
    total look smaller by choosing a tighter accountant than another run used. With one
    accountant this is exactly :func:`epsilon_of`.

    Parameters
    ----------
    history : iterable of (noise_multiplier, sample_rate, steps)
        Every stretch of DP-SGD of every run.
    delta : float
        The delta the epsilon is stated at (the site's).
    accountants : iterable of str
        Names from :data:`ACCOUNTANTS`; at least one.

    Raises
    ------
    ConfigError
        For no accountant or an unknown one.
    """
    names = sorted(set(accountants))
    if not names:
        raise ConfigError(f"composing a history needs at least one accountant; use one of {', '.join(ACCOUNTANTS)}")
    steps = compact_history(history)
    return max(epsilon_of(steps, delta=delta, accountant=name) for name in names)


def calibrate_noise_after(
    prior: History,
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountants: Iterable[str],
    start: float,
) -> float:
    """Noise multiplier so that ``prior`` plus ``steps`` new steps compose to at most ``target_epsilon``.

    Opacus' :func:`~opacus.accountants.utils.get_noise_multiplier` calibrates a run on
    its own; a site that has already spent some of its budget in earlier runs needs the
    noise for which *everything* composed stays inside it. Bisection on
    :func:`composed_epsilon` (monotone in the noise), to within 1 % below the target.

    Parameters
    ----------
    prior : iterable of (noise_multiplier, sample_rate, steps)
        What the site has already spent (all runs).
    target_epsilon, delta : float
        The site's budget and the delta it is stated at.
    sample_rate : float
        Poisson sampling probability of the new steps.
    steps : int
        DP-SGD steps of the whole planned run.
    accountants : iterable of str
        As for :func:`composed_epsilon`.
    start : float
        A noise multiplier known to be too small (e.g. the run's own calibration).

    Raises
    ------
    ValueError
        When no noise multiplier up to Opacus' ceiling fits: the prior already uses up
        (almost) all of the target.
    """
    names = sorted(set(accountants))
    history = compact_history(prior)

    def spent(sigma: float) -> float:
        return composed_epsilon([*history, (sigma, sample_rate, steps)], delta=delta, accountants=names)

    low, high = max(start, 0.0), max(2.0 * start, 0.1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")  # large probes, as in calibrate_noise
        while spent(high) > target_epsilon:
            low, high = high, 2.0 * high
            if high > MAX_NOISE_MULTIPLIER:
                raise ValueError(f"no noise multiplier up to {MAX_NOISE_MULTIPLIER:g} keeps the composed epsilon within {target_epsilon:g}")
        for _ in range(60):
            mid = (low + high) / 2.0
            eps = spent(mid)
            if eps > target_epsilon:
                low = mid
            else:
                high = mid
                if eps >= 0.99 * target_epsilon:
                    break
            if high - low <= 1e-6 * high:
                break
    return float(high)
