"""Every site reply is checked before anything aggregates it.

A reply is what a site *says*: one broken or malicious site that sends NaN, an array
of the wrong shape, or claims 10^9 training images would otherwise take the FedAvg
average over, or crash the strategy. :class:`UpdateValidator` checks a train reply
against the global model the server sent that round, and either returns a clean copy
for the strategy (only the records and metrics the strategy needs, weighted by the
validated count) or raises :class:`UpdateRefused` with the reason, which the
:class:`~.guard.SiteGuard` records as that site's failure for the round.

The rules, in order (docs/privacy.md, "Update validation"):

1. one ArrayRecord and one MetricRecord;
2. the arrays: exactly the names the server sent, each a numpy array (never
   unpickled) of the sent shape and dtype, no larger on the wire than it needs;
3. every value finite;
4. the training-image count: a whole number, at least 1, at most ``max-site-examples``
   and at most what the site claimed the first time this server saw it in the run;
5. in a DP run, the DP-SGD accounting (``dp = 1`` and every key of
   :data:`~fedlens.shared.protocol.PRIVACY_METRICS`, finite);
6. the distance from the global model (L2 norm of the update) at most
   ``max-update-norm``, or, in a DP run with SGD, the bound
   :func:`~fedlens.shared.privacy.dpsgd.update_norm_bound` derives from the clipping
   bound, learning rate, momentum, steps and the site's noise multiplier; under
   ``central-dp = "client"`` at most ``central-clip`` (the site's clipping mod clips to it).

Evaluation replies get rules 1, 3 and 4 (a count of 0 is allowed: a site may hold no
evaluation images). With SecAgg+ the server never sees a single update: it checks
what travels in the clear (count, accounting, the masked vector's layout) per site,
and the aggregate after unmasking (:meth:`UpdateValidator.check_aggregate`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedlens.shared.config import FedConfig
from fedlens.shared.privacy.dpsgd import update_norm_bound
from fedlens.shared.protocol import NUM_EXAMPLES, PRIVACY_METRICS, UNIT_WEIGHT

__all__ = ["UpdateValidator", "UpdateRefused", "norm_bound_rule"]

_log = logging.getLogger("fedlens.server.validate")

# An Array travels as an .npy file; numpy writes headers of a few hundred bytes (dtype, shape).
_NPY_HEADER_MAX = 4096


class UpdateRefused(Exception):
    """A site's reply broke a validation rule; the message says which and how."""


def norm_bound_rule(cfg: FedConfig) -> str:
    """In words, how updates' distances from the global model are bounded in this run (for logs and docs)."""
    if cfg.max_update_norm > 0:
        return f"max-update-norm {cfg.max_update_norm:g}"
    if cfg.central_dp == "client":
        return f"central-clip {cfg.central_clip:g} (sites clip their updates)"
    if cfg.dp and _derivable(cfg):
        return "derived from DP-SGD (clipping, lr, momentum, steps, noise)"
    return "none (no DP-SGD bound applies: set max-update-norm)"


def _derivable(cfg: FedConfig) -> bool:
    """Whether :func:`update_norm_bound` covers this run's site optimiser."""
    prox_ok = cfg.strategy != "fedprox" or cfg.lr * cfg.proximal_mu <= 2.0
    return cfg.optimizer == "sgd" and cfg.weight_decay == 0.0 and prox_ok


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(metrics: Mapping[str, object], *, minimum: int) -> int:
    """The training-image count a reply claims, as an int, or raise."""
    if NUM_EXAMPLES not in metrics:
        raise UpdateRefused(f"the reply has no `{NUM_EXAMPLES}` (the number of images it trained on)")
    value = metrics[NUM_EXAMPLES]
    if not _finite_number(value) or value != int(value):  # type: ignore[call-overload]
        raise UpdateRefused(f"`{NUM_EXAMPLES}` must be a whole number, got {value!r}"[:200])
    if int(value) < minimum:
        raise UpdateRefused(f"`{NUM_EXAMPLES}` is {int(value)}, below {minimum}")
    return int(value)


_Record = TypeVar("_Record")


def _one(records: Mapping[str, _Record], kind: str) -> _Record:
    if len(records) != 1:
        raise UpdateRefused(f"the reply must carry exactly one {kind}, it carries {len(records)}")
    return next(iter(records.values()))


def _scalars(metrics: MetricRecord) -> dict[str, float]:
    """The finite scalar metrics (lists and non-finite values are dropped)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if _finite_number(value):
            out[str(key)] = float(value)  # type: ignore[arg-type]
    return out


class UpdateValidator:
    """The rules of one run; :meth:`expect` gives it each round's global model.

    Parameters
    ----------
    cfg : FedConfig
        The run's configuration (DP settings, ``max-update-norm``, ``max-site-examples``).
    weight_key : str
        The metric the strategy weights updates by (``num-examples``, or ``unit-weight``
        under central DP); the clean reply carries it with the validated value.
    """

    def __init__(self, cfg: FedConfig, *, weight_key: str = NUM_EXAMPLES) -> None:
        self.cfg = cfg
        self.weight_key = weight_key
        self._global: dict[str, np.ndarray] = {}
        self._claims: dict[str, int] = {}  # each site's first training-image claim in this run
        self._warned_no_bound = False

    # ---- the round's reference ---------------------------------------------------
    def expect(self, arrays: ArrayRecord) -> None:
        """The global model sent to the sites this round: replies must match its names, shapes and dtypes."""
        self._global = {name: np.asarray(array.numpy()) for name, array in arrays.items()}

    @property
    def num_params(self) -> int:
        return sum(a.size for a in self._global.values())

    # ---- train replies -------------------------------------------------------------
    def train_reply(self, site: str, content: RecordDict) -> RecordDict:
        """A clean copy of a train reply for the strategy, or :class:`UpdateRefused`.

        The copy holds the reply's ArrayRecord (checked, not re-encoded) and a
        MetricRecord of its finite scalar metrics with the validated count (and a unit
        weight of exactly 1 under central DP).
        """
        arrays = _one(content.array_records, "ArrayRecord")
        metrics = _one(content.metric_records, "MetricRecord")
        count = self._train_count(site, metrics)
        noise = self._noise_multiplier(metrics)
        decoded = self._arrays(arrays)
        bound = self.norm_bound(num_examples=count, noise_multiplier=noise)
        if bound is not None:
            distance = self._distance(decoded)
            _log.debug("site %s: update norm %.4g, bound %.4g", site, distance, bound)
            if distance > bound:
                raise UpdateRefused(
                    f"the update moves the model by {distance:.4g} (L2), more than the bound {bound:.4g} "
                    f"({norm_bound_rule(self.cfg)}); an honest site stays within it"
                )
        clean = _scalars(metrics)
        clean[NUM_EXAMPLES] = float(count)
        if self.weight_key == UNIT_WEIGHT:
            clean[UNIT_WEIGHT] = 1.0  # central DP weights every site equally, whatever it says
        return RecordDict({"arrays": arrays, "metrics": MetricRecord(clean)})

    def check_plaintext(self, site: str, metrics: Mapping[str, object]) -> int:
        """Rules 4 and 5 on what a SecAgg+ reply carries in the clear; returns the validated count."""
        count = self._train_count(site, metrics)
        self._noise_multiplier(metrics)
        return count

    def _train_count(self, site: str, metrics: Mapping[str, object]) -> int:
        count = _count(metrics, minimum=1)
        if count > self.cfg.max_site_examples:
            raise UpdateRefused(
                f"it claims {count} training images, more than max-site-examples ({self.cfg.max_site_examples}); "
                "FedAvg weights updates by this claim (raise max-site-examples for a site that really holds more)"
            )
        first = self._claims.setdefault(site, count)
        if count > first:
            raise UpdateRefused(
                f"it claims {count} training images, more than the {first} it claimed first in this run; "
                "a site's data may not grow during a run"
            )
        return count

    def _noise_multiplier(self, metrics: Mapping[str, object]) -> float | None:
        """The DP-SGD noise multiplier a reply reports; in a DP run its whole accounting must be there."""
        if not self.cfg.dp:
            return None
        facts = [metrics.get(key) for key in PRIVACY_METRICS]
        if metrics.get("dp") != 1 or not all(_finite_number(v) and v >= 0 for v in facts):  # type: ignore[operator]
            raise UpdateRefused(
                f"the reply has no DP-SGD accounting (`dp` = 1 and finite {', '.join(PRIVACY_METRICS)}): "
                "a DP run aggregates only DP-SGD updates"
            )
        return float(metrics["noise-multiplier"])  # type: ignore[arg-type]

    def _arrays(self, record: ArrayRecord) -> dict[str, np.ndarray]:
        """Decode every array, checking names, encoding, size, shape, dtype and finiteness."""
        names, expected = set(record.keys()), set(self._global)
        if names != expected:
            missing, extra = sorted(expected - names), sorted(names - expected)
            raise UpdateRefused(f"the arrays do not match the model: missing {missing[:5]}, unexpected {[n[:80] for n in extra[:5]]}")
        out = {}
        for name, reference in self._global.items():
            out[name] = _decode(name, record[name], reference)
        return out

    def _distance(self, decoded: Mapping[str, np.ndarray]) -> float:
        total = 0.0
        for name, reference in self._global.items():
            diff = decoded[name].astype(np.float64) - reference.astype(np.float64)
            total += float(np.dot(diff.ravel(), diff.ravel()))
        return math.sqrt(total)

    def norm_bound(self, *, num_examples: int, noise_multiplier: float | None) -> float | None:
        """The largest distance from the global model an honest update of this site has (None: no norm rule)."""
        cfg = self.cfg
        if cfg.max_update_norm > 0:
            return cfg.max_update_norm
        if cfg.central_dp == "client":
            return cfg.central_clip * (1 + 1e-4) + 1e-6  # the site's clipping mod scaled the update to this norm
        if not cfg.dp or noise_multiplier is None:
            return None
        if not _derivable(cfg):
            if not self._warned_no_bound:
                self._warned_no_bound = True
                _log.warning(
                    "no update-norm rule: the DP-SGD bound covers SGD without weight decay only (this run: %s, weight-decay %g); "
                    "set max-update-norm to bound updates",
                    cfg.optimizer,
                    cfg.weight_decay,
                )
            return None
        return update_norm_bound(
            lr=cfg.lr,
            momentum=cfg.momentum,
            max_grad_norm=cfg.max_grad_norm,
            noise_multiplier=noise_multiplier,
            batch_size=cfg.batch_size,
            num_examples=num_examples,
            epochs=cfg.local_epochs,
            num_params=self.num_params,
        )

    # ---- evaluation replies --------------------------------------------------------
    def evaluate_reply(self, content: RecordDict) -> RecordDict:
        """A clean copy of an evaluation reply (finite scalar metrics and a valid count), or :class:`UpdateRefused`."""
        metrics = _one(content.metric_records, "MetricRecord")
        count = _count(metrics, minimum=0)
        if count > self.cfg.max_site_examples:
            raise UpdateRefused(f"it claims {count} evaluation images, more than max-site-examples ({self.cfg.max_site_examples})")
        clean = _scalars(metrics)
        clean[NUM_EXAMPLES] = float(count)
        if self.weight_key == UNIT_WEIGHT:
            clean[UNIT_WEIGHT] = 1.0
        return RecordDict({"metrics": MetricRecord(clean)})

    # ---- SecAgg+: the aggregate ------------------------------------------------------
    def check_aggregate(self, arrays: ArrayRecord, *, counts: list[int], noises: list[float | None], tolerance: float = 0.0) -> None:
        """Rules 2, 3 and 6 on an aggregate (SecAgg+: the only model the server sees).

        The weighted mean of updates each within its bound is within the largest bound;
        ``tolerance`` adds the quantisation error of secure aggregation.

        Raises
        ------
        UpdateRefused
            When the aggregate has the wrong layout, a non-finite value, or moves too far.
        """
        decoded = self._arrays(arrays)
        bounds = [self.norm_bound(num_examples=n, noise_multiplier=s) for n, s in zip(counts, noises)]
        known = [b for b in bounds if b is not None]
        if known and len(known) == len(bounds):
            bound = max(known) + tolerance
            distance = self._distance(decoded)
            if distance > bound:
                raise UpdateRefused(
                    f"the securely aggregated update moves the model by {distance:.4g} (L2), more than any honest site's "
                    f"bound {bound:.4g} ({norm_bound_rule(self.cfg)}): at least one site sent an update out of bounds"
                )


def _decode(name: str, array: object, reference: np.ndarray) -> np.ndarray:
    """One array of a reply, decoded safely and checked against the global model's ``reference``."""
    if not isinstance(array, Array):
        raise UpdateRefused(f"{name!r} is not an array")
    if array.stype != "numpy.ndarray":
        raise UpdateRefused(f"{name!r} is encoded as {str(array.stype)[:40]!r}, not numpy.ndarray")
    if len(array.data) > reference.nbytes + _NPY_HEADER_MAX:
        raise UpdateRefused(f"{name!r} is {len(array.data)} bytes, far more than its {reference.dtype} {reference.shape} needs")
    try:
        value = array.numpy()  # np.load(allow_pickle=False): never unpickles
    except Exception as exc:  # truncated or garbage bytes
        raise UpdateRefused(f"{name!r} cannot be read as an array ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(value, np.ndarray) or value.shape != reference.shape or value.dtype != reference.dtype:
        shape = getattr(value, "shape", "?")
        dtype = getattr(value, "dtype", type(value).__name__)
        raise UpdateRefused(f"{name!r} is {dtype} {shape}, the model's is {reference.dtype} {reference.shape}")
    if value.dtype.kind in "fc" and not np.isfinite(value).all():
        bad = int(value.size - np.isfinite(value).sum())
        raise UpdateRefused(f"{name!r} holds {bad} non-finite value(s) (NaN or infinity)")
    return value
