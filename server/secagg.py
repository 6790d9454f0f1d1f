"""Federated averaging whose aggregation goes through Flower's SecAgg+ protocol.

Flower 1.42 only offers SecAgg+ on its legacy path (``SecAggPlusWorkflow`` with a
``LegacyContext`` and the legacy ``FedAvg``). This module is the one place on the
server that touches that path: it takes and returns Message-API records and keeps
the legacy objects inside.

What the server learns per site and round is the masked vector (uniformly random
modulo 2**32 on its own), the site's number of examples and the site's reply
metrics, which travel in plaintext next to the masked vector (see
``client/secagg.py``). Only the weighted sum of the updates is ever unmasked.

The round loop is ours rather than ``DefaultWorkflow``'s: that loop carries on
with the old weights when SecAgg+ halts (too few sites, too few key shares),
evaluates the initial model as round 0 and leaves a polling thread behind when a
callback raises. Here a halted round raises :class:`RuntimeError`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedlens.shared.protocol import NUM_EXAMPLES, PARAM_NAMES_KEY, SITE_RECORD

from .sites import DelegatingGrid, clean_site_name, wait_for_sites

__all__ = ["run_secagg_rounds", "MAX_WEIGHT", "QUANTIZATION_RANGE"]

_log = logging.getLogger("fedlens.server.secagg")

# SecAgg+ weight cap: a site's values are scaled by num_examples / max_weight, then
# clipped to [-clipping_range, clipping_range]. 10,000 (not Flower's 1,000) keeps the
# scale at most 1 for sites of up to 10,000 images, so their updates are never scaled
# *up* towards the clipping range; the weight total still fits the modulus for about
# 10 million images (2**32 / quantization_range * max_weight, default quantization_range).
MAX_WEIGHT = 10_000.0
# Quantisation levels over [-clipping_range, clipping_range] (Flower's default, 2**22).
QUANTIZATION_RANGE = 4_194_304
# Flower's default mask modulus. Sums travel modulo this, so both the summed
# quantised values (sites x quantization_range) and the summed quantised weights
# must stay below it, or the aggregate wraps around without any error.
MODULUS = 2**32
# How long to wait for ``min_sites`` sites to connect when no ``timeout`` is given.
_CONNECT_WAIT_S = 60.0

ConfigValue = int | float | str | bool
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]
# on_round(round, per-site metrics, failures by node id, site names by node id)
OnRound = Callable[[int, dict[str, dict[str, float]], dict[int, str], dict[int, str]], None]
# check_reply(site, plaintext metrics) -> None, or the reason the site's masked update is left out.
CheckReply = Callable[[str, dict[str, float]], str | None]


@dataclass
class _RoundLog:
    """What the sites answered in one round, collected at the grid."""

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)  # node id -> the name its masked-vector reply carried


class _ObservedGrid(DelegatingGrid):
    """Delegate to ``grid``; note each site's metrics and failures per SecAgg+ stage.

    The legacy workflow keeps replies to itself and its failures carry no node id,
    so per-site outcomes are read off the messages as they pass. A masked-vector reply
    whose layout or plaintext (``check_reply``) is refused never reaches the workflow:
    SecAgg+ then treats the site as dropped out, removes its masks with the key shares
    of its neighbours, and aggregates the others.
    """

    def __init__(self, grid: Grid, *, shapes: list[tuple[int, ...]], check_reply: CheckReply | None = None) -> None:
        super().__init__(grid)
        self.round = _RoundLog()
        self.shapes = [(1,), *shapes]  # SecAgg+ puts the quantised weight first
        self.check_reply = check_reply

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        stage = _stage(messages[0]) if messages else "unknown"
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        answered = {m.metadata.src_node_id for m in replies}
        for msg in messages:
            if msg.metadata.dst_node_id not in answered:
                self.round.failures.setdefault(msg.metadata.dst_node_id, f"{stage}: no reply within {timeout} s")
        kept = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.round.failures.setdefault(node, f"{stage}: {reply.error.reason}")
            elif stage == Stage.COLLECT_MASKED_VECTORS:
                name = _site_name(reply)
                self.round.names[node] = name
                problem, metrics = self._refusal(reply, name)
                if problem:
                    _log.warning("site %s: masked update refused: %s", name, problem)
                    self.round.failures[node] = f"{stage}: update refused: {problem}"
                    continue
                self.round.metrics[name] = metrics
            kept.append(reply)
        return kept

    def _refusal(self, reply: Message, name: str) -> tuple[str | None, dict[str, float]]:
        """Why a masked-vector reply is left out (None: it is not), and its plaintext metrics."""
        try:
            metrics = _site_metrics(reply)
            vectors = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]  # type: ignore[union-attr]
        except Exception as exc:  # garbage where the protocol expects its records
            return f"unreadable SecAgg+ reply ({type(exc).__name__}: {str(exc)[:120]})", {}
        if [v.shape for v in vectors] != self.shapes or any(v.dtype.kind not in "iu" for v in vectors):
            return "the masked vector does not have the model's layout", metrics
        if self.check_reply is not None and (problem := self.check_reply(name, metrics)):
            return problem, metrics
        return None, metrics


def _stage(msg: Message) -> str:
    return str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])


def _site_name(reply: Message) -> str:
    """The name a masked-vector reply carries (the registry's, behind a RegistryNamedGrid), or ``node-<id>``."""
    site = reply.content.config_records.get(SITE_RECORD)
    return clean_site_name(site.get("name") if site is not None else None) or f"node-{reply.metadata.src_node_id}"


def _site_metrics(reply: Message) -> dict[str, float]:
    """Numeric metrics of a masked-vector reply (plaintext records), with its number of examples."""
    content = reply.content
    raw = content.config_records.get("fitres.metrics", ConfigRecord())
    metrics = {k: float(v) for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics[NUM_EXAMPLES] = float(content.metric_records["fitres.num_examples"]["num_examples"])  # type: ignore[arg-type]
    return metrics


def _register_sites(grid: Grid, manager: SimpleClientManager, min_sites: int, wait_s: float) -> int:
    """Make the client manager hold exactly the connected nodes; wait for ``min_sites``."""
    if len(nodes := wait_for_sites(grid, min_sites, wait_s=wait_s)) < min_sites:
        raise RuntimeError(
            f"SecAgg+ needs at least {min_sites} sites (min_sites), but only {len(nodes)} "
            f"connected within {wait_s:.0f} s; start more sites or lower min-sites"
        )
    known = manager.all()
    for node in set(known) - {str(n) for n in nodes}:
        manager.unregister(known[node])
    for node in nodes - {int(n) for n in known}:
        manager.register(GridClientProxy(node_id=node, grid=grid, run_id=grid.run.run_id))
    return len(nodes)


def _check_arguments(initial_arrays: ArrayRecord, num_rounds: int, train_config: dict[str, ConfigValue], min_sites: int) -> None:
    if num_rounds < 1:
        raise ValueError(f"num_rounds must be at least 1, got {num_rounds}")
    if min_sites < 2:
        raise ValueError(f"SecAgg+ needs at least 2 sites per round; min_sites is {min_sites}")
    if PARAM_NAMES_KEY in train_config:
        raise ValueError(f"train_config must not use the reserved key {PARAM_NAMES_KEY!r}")
    if len(initial_arrays) == 0:
        raise ValueError("initial_arrays is empty: nothing to aggregate")
    for name, array in initial_arrays.items():
        if not np.issubdtype(np.dtype(array.numpy().dtype), np.floating):
            raise ValueError(
                f"SecAgg+ quantises floating-point arrays only; {name!r} has dtype {array.dtype}. "
                "Send only the trainable parameters (no integer buffers such as num_batches_tracked)."
            )


def _failure_text(failures: dict[int, str]) -> str:
    return "; ".join(f"node {node}: {reason.strip().splitlines()[-1]}" for node, reason in failures.items()) or "no site reported an error"


def run_secagg_rounds(
    grid: Grid,
    *,
    initial_arrays: ArrayRecord,
    num_rounds: int,
    train_config: dict[str, ConfigValue],
    evaluate_fn: EvaluateFn,
    on_round: OnRound | None = None,
    num_shares: int = 3,
    reconstruction_threshold: int = 2,
    clipping_range: float = 8.0,
    quantization_range: int = QUANTIZATION_RANGE,
    max_weight: float = MAX_WEIGHT,
    min_sites: int = 2,
    timeout: float | None = None,
    check_reply: CheckReply | None = None,
) -> ArrayRecord:
    """Run ``num_rounds`` rounds of FedAvg, each aggregated with SecAgg+.

    Every connected site trains in every round. The new model is the average of
    the sites' models weighted by their numbers of examples, computed by Flower's
    SecAgg+ protocol, so the server never sees a single site's model.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid.
    initial_arrays : ArrayRecord
        Named floating-point arrays to start from (the trainable parameters only).
    num_rounds : int
        Rounds to run; rounds are numbered 1..num_rounds here.
    train_config : dict of str to int, float, str or bool
        Sent to every site in every round, with ``"server-round"`` set to the
        1-based round of this call.
    evaluate_fn : callable
        ``evaluate_fn(round, arrays)`` after each round, with the aggregated arrays.
    on_round : callable, optional
        ``on_round(round, per_site_metrics, failures, names)`` before ``evaluate_fn``:
        each aggregated site's numeric reply metrics (plus ``"num-examples"``) by
        site name, the reason by node id for every site that failed, was refused or
        did not answer in some stage of the round, and the names by node id of the
        sites that sent a masked vector.
    num_shares : int, default 3
        Shares each site's secrets are split into (its neighbourhood size, odd).
    reconstruction_threshold : int, default 2
        Shares needed to rebuild a secret; a site's neighbourhood survives
        ``num_shares - reconstruction_threshold`` dropouts.
    clipping_range : float, default 8.0
        Each site clips ``num_examples / max_weight * value`` to this range before
        quantisation (the site refuses rather than clip silently).
    quantization_range : int, default 2**22
        Quantisation levels over ``[-clipping_range, clipping_range]``.
    max_weight : float, default MAX_WEIGHT (10,000)
        A site's values are scaled by ``num_examples / max_weight`` before clipping;
        pick it near the largest site so values stay inside the clipping range.
    min_sites : int, default 2
        Sites that must be connected at the start of each round.
    timeout : float, optional
        Seconds to wait for replies in each of the four SecAgg+ stages, and for
        ``min_sites`` sites to connect (60 s when None; replies are then awaited
        without limit).
    check_reply : callable, optional
        ``check_reply(site, metrics)`` on what each masked-vector reply carries in
        the clear (its metrics and ``"num-examples"``): a returned reason leaves that
        site's update out of the sum (SecAgg+ treats it as dropped out) and is
        reported as its failure. Replies whose masked vector does not have the
        model's layout are left out the same way.

    Returns
    -------
    ArrayRecord
        The final arrays, with the names, order and dtypes of ``initial_arrays``.

    Raises
    ------
    ValueError
        When an argument is out of range or an array is not floating-point.
    RuntimeError
        When fewer than ``min_sites`` sites are connected, or SecAgg+ could not
        complete a round (too many sites failed); the message lists the reasons.
    """
    _check_arguments(initial_arrays, num_rounds, train_config, min_sites)
    rounds = _SecAggRounds(
        grid,
        initial_arrays,
        train_config,
        num_shares=num_shares,
        reconstruction_threshold=reconstruction_threshold,
        clipping_range=clipping_range,
        quantization_range=quantization_range,
        max_weight=max_weight,
        min_sites=min_sites,
        timeout=timeout,
        check_reply=check_reply,
    )
    arrays = initial_arrays
    for rnd in range(1, num_rounds + 1):
        arrays = rounds.aggregate(rnd, num_rounds)
        _report_round(rnd, num_rounds, rounds.observed.round, arrays, evaluate_fn, on_round)
    return arrays


def _legacy_context(grid: Grid, train_config: dict[str, ConfigValue], names: list[str], min_sites: int) -> LegacyContext:
    """The legacy FedAvg (every connected site trains; the names ride along) in a ``LegacyContext``."""
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=min_sites,
        min_available_clients=min_sites,
        on_fit_config_fn=lambda rnd: {**train_config, "server-round": rnd, PARAM_NAMES_KEY: names},  # type: ignore[dict-item]
        # Per-site metrics are read at the grid (with node ids); nothing to aggregate here.
        fit_metrics_aggregation_fn=lambda _metrics: {},
    )
    base = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    return LegacyContext(base, strategy=strategy, client_manager=SimpleClientManager())


class _SecAggRounds:
    """One SecAgg+ run's legacy objects and current model; :meth:`aggregate` runs one round.

    The model travels between rounds as a list of arrays in the order of ``names``
    (legacy ``Parameters``), and comes back with the dtypes of ``initial_arrays``.
    """

    def __init__(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        train_config: dict[str, ConfigValue],
        *,
        num_shares: int,
        reconstruction_threshold: int,
        clipping_range: float,
        quantization_range: int,
        max_weight: float,
        min_sites: int,
        timeout: float | None,
        check_reply: CheckReply | None = None,
    ) -> None:
        self.names = list(initial_arrays.keys())
        self.dtypes = [initial_arrays[n].numpy().dtype for n in self.names]
        self.current = [initial_arrays[n].numpy() for n in self.names]
        self.observed = _ObservedGrid(grid, shapes=[a.shape for a in self.current], check_reply=check_reply)
        self.context = _legacy_context(grid, train_config, self.names, min_sites)
        self.workflow = SecAggPlusWorkflow(
            num_shares,
            reconstruction_threshold,
            max_weight=max_weight,
            modulus_range=MODULUS,
            clipping_range=clipping_range,
            quantization_range=quantization_range,
            timeout=timeout,
        )
        self.reconstruction_threshold = reconstruction_threshold
        self.quantization_range = quantization_range
        self.max_weight = max_weight
        self.min_sites = min_sites
        self.connect_wait_s = timeout or _CONNECT_WAIT_S
        self.started = time.monotonic()

    def aggregate(self, rnd: int, num_rounds: int) -> ArrayRecord:
        """Run round ``rnd``: register the connected sites, securely sum their updates, return the average.

        Raises
        ------
        RuntimeError
            Too few sites, a sum that would overflow the modulus, or a round SecAgg+ halted or failed.
        """
        sites = _register_sites(self.observed, self.context.client_manager, self.min_sites, self.connect_wait_s)
        self._check_value_total(rnd, sites)
        _log.info("round %d/%d: secure aggregation over %d sites", rnd, num_rounds, sites)
        after = self._secure_sum(rnd, sites)
        self._check_weight_total(rnd)
        aggregated = parameters_to_ndarrays(compat.arrayrecord_to_parameters(after, keep_input=True))
        self.current = [np.ascontiguousarray(a, dtype=d) for a, d in zip(aggregated, self.dtypes, strict=True)]
        return ArrayRecord({n: torch.from_numpy(a) for n, a in zip(self.names, self.current, strict=True)})

    def _check_value_total(self, rnd: int, sites: int) -> None:
        if sites * self.quantization_range >= MODULUS:
            raise RuntimeError(
                f"round {rnd}: {sites} sites x quantization_range {self.quantization_range} would overflow the "
                f"SecAgg+ modulus 2**32; lower quantization_range below {MODULUS // sites}"
            )

    def _secure_sum(self, rnd: int, sites: int) -> ArrayRecord:
        """Run the SecAgg+ workflow on the current model; the aggregate it leaves in the context."""
        before = compat.parameters_to_arrayrecord(ndarrays_to_parameters(self.current), keep_input=True)
        self.context.state.array_records[MAIN_PARAMS_RECORD] = before
        self.context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: rnd, WorkflowKey.START_TIME: self.started}
        )
        self.observed.round = _RoundLog()
        try:
            self.workflow(self.observed, self.context)
        except Exception as exc:  # the protocol's own checks (e.g. tampered shares)
            raise RuntimeError(f"round {rnd}: SecAgg+ failed: {exc} ({_failure_text(self.observed.round.failures)})") from exc
        after = self.context.state.array_records[MAIN_PARAMS_RECORD]
        if after is before:  # the workflow halts without raising and leaves the model as it was
            raise RuntimeError(
                f"round {rnd}: SecAgg+ halted: too few sites completed the protocol "
                f"({len(self.observed.round.metrics)} of {sites} sent masked updates; a site needs "
                f"{self.reconstruction_threshold} live neighbours). Failures: {_failure_text(self.observed.round.failures)}"
            )
        return after

    def _check_weight_total(self, rnd: int) -> None:
        examples = [m[NUM_EXAMPLES] for m in self.observed.round.metrics.values()]
        weight_levels = sum(round(n / self.max_weight * self.quantization_range) for n in examples)
        if weight_levels >= MODULUS:
            raise RuntimeError(
                f"round {rnd}: the sites' examples ({sum(examples):.0f}) overflow SecAgg+'s weight total "
                f"(limit {MODULUS / self.quantization_range * self.max_weight:.0f} with "
                f"quantization_range {self.quantization_range}); the aggregate is invalid"
            )


def _report_round(
    rnd: int, num_rounds: int, log: _RoundLog, arrays: ArrayRecord, evaluate_fn: EvaluateFn, on_round: OnRound | None
) -> None:
    """Log the round's failures, hand its site outcomes to ``on_round``, then evaluate."""
    for node, reason in log.failures.items():
        _log.warning("round %d: node %d failed: %s", rnd, node, reason.strip().splitlines()[-1])
    if on_round is not None:  # before evaluate_fn, which may record the sites' metrics
        on_round(rnd, dict(log.metrics), dict(log.failures), dict(log.names))
    metrics = evaluate_fn(rnd, arrays)
    _log.info("round %d/%d done: %d sites aggregated; server metrics %s", rnd, num_rounds, len(log.metrics), dict(metrics or {}))
