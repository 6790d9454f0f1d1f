"""A strategy wrapper that watches every reply: validation, per-site outcomes, and a hard stop.

Flower's strategies log failed replies and carry on with the old weights even when
every site failed, and trust whatever a reply holds. fedlens checks each reply
(:class:`~.validate.UpdateValidator`) before the strategy sees it, records each
site's outcome for the run summary (a refused update is that site's failure for the
round, and the round goes on with the others), and stops the run with a clear
reason when a round produced no usable update.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlens.shared.protocol import SITE_RECORD

from .sites import SiteRegistry, clean_site_name
from .validate import UpdateRefused, UpdateValidator

__all__ = ["SiteGuard", "AllSitesFailed", "RunStopped", "RunDiverged", "RoundReport", "is_refusal"]

_log = logging.getLogger("fedlens.server.guard")


def last_line(text: str) -> str:
    """The last non-empty line of an error report (a traceback ends with the error)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "unknown error"


class AllSitesFailed(RuntimeError):
    """No site returned a usable update in a round."""


class RunStopped(Exception):
    """The run ends early for a reason that is not a fault (privacy budgets used up)."""


class RunDiverged(Exception):
    """The global model diverged in round ``round`` (test loss ``loss``); the run fails.

    Not a RuntimeError: nothing on the way out (the SecAgg+ path) may turn it into another failure.
    """

    def __init__(self, message: str, *, round: int, loss: float) -> None:
        super().__init__(message)
        self.round, self.loss = round, loss


# How a site's refusal on privacy grounds shows in its error reply (exception class names).
REFUSAL_MARKS = ("BudgetExceeded", "SiteRefusal")


def is_refusal(reason: str) -> bool:
    """Whether a failure reason is a site declining on privacy grounds (not a crash)."""
    return any(mark in reason for mark in REFUSAL_MARKS)


class RoundReport:
    """What the sites said in one round, keyed by site name."""

    def __init__(self) -> None:
        self.train: dict[str, dict[str, float]] = {}
        self.evaluate: dict[str, dict[str, float]] = {}
        self.failed: dict[int, str] = {}  # node id -> reason; named once the node is known
        self.train_aggregate: dict[str, float] = {}
        self.evaluate_aggregate: dict[str, float] = {}


class SiteGuard(Strategy):
    """Wrap ``inner``; delegate everything, inspect replies.

    Parameters
    ----------
    inner : Strategy
        The aggregation strategy doing the real work.
    registry : SiteRegistry, optional
        The server's site registry: sites are named by it (by the node id the
        authenticated reply came from). Without one (simulation, ``--insecure``),
        by the name a site reports about itself (:data:`SITE_RECORD`).
    validator : UpdateValidator, optional
        Checks every train and evaluation reply before ``inner`` sees it; without one,
        replies reach ``inner`` as they came (tests of the bookkeeping only).
    """

    def __init__(self, inner: Strategy, registry: SiteRegistry | None = None, *, validator: UpdateValidator | None = None) -> None:
        self.inner = inner
        self.registry = registry
        self.validator = validator
        self.names: dict[int, str] = {}
        self.current = RoundReport()
        self._sent: list[int] = []
        self._sent_msgs: list[Message] = []

    def _source(self, msg: Message) -> int:
        """The site a reply is about: the SuperLink answers for an unreachable site
        (as node ``SUPERLINK_NODE_ID``), so such errors are traced back via ``reply_to``."""
        node = msg.metadata.src_node_id
        if not msg.has_error():
            return node
        reply_to = msg.metadata.reply_to_message_id
        for sent in self._sent_msgs:
            if reply_to and sent.metadata.message_id == reply_to:
                return sent.metadata.dst_node_id
        return node

    def _name(self, msg: Message) -> str:
        node = self._source(msg)
        if self.registry is None and node not in self.names and msg.has_content() and SITE_RECORD in msg.content.config_records:
            name = clean_site_name(msg.content.config_records[SITE_RECORD].get("name"))
            if name is None:
                return self.site_name(node)
            if name in self.names.values():  # names are self-reported: two sites must not merge
                _log.warning("two sites call themselves %r; the one on node %d is reported as %s@%d", name, node, name, node)
                name = f"{name}@{node}"
            self.names[node] = name
        return self.site_name(node)

    def site_name(self, node: int) -> str:
        """The node's name in the registry; without a registry, the name it reported in any reply so far, else ``node-<id>``."""
        if self.registry is not None:
            return self.registry.name(node)
        return self.names.get(node, f"node-{node}")

    def round_failures(self) -> dict[str, str]:
        """This round's failures by site name (names learnt from any later reply too)."""
        return {self.site_name(node): reason for node, reason in self.current.failed.items()}

    def _split(self, replies: Iterable[Message], phase: str) -> tuple[list[Message], list[Message]]:
        """``(accepted, errors)``: the replies that passed validation (their content replaced by
        the validator's clean copy) and the error replies; every other outcome is recorded."""
        accepted, errors = [], []
        check = self._checker(phase)
        for msg in replies:
            name = self._name(msg)
            if msg.has_error():
                self.current.failed[self._source(msg)] = f"{phase}: {msg.error.reason}"
                verb = "declined" if is_refusal(msg.error.reason) else "failed in"
                _log.warning("site %s %s %s: %s", name, verb, phase, last_line(msg.error.reason))
                errors.append(msg)
                continue
            try:
                msg.content = check(name, msg.content)
            except UpdateRefused as exc:
                self._refuse(msg, name, phase, str(exc))
                continue
            except Exception as exc:  # a reply no rule foresaw must not take the server down
                self._refuse(msg, name, phase, f"unreadable reply ({type(exc).__name__}: {str(exc)[:200]})")
                continue
            metrics = next(iter(msg.content.metric_records.values()), MetricRecord())
            target = self.current.train if phase == "train" else self.current.evaluate
            target[name] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            accepted.append(msg)
        return _common_metrics(accepted), errors

    def _checker(self, phase: str) -> Callable[[str, RecordDict], RecordDict]:
        if self.validator is None:
            return lambda _name, content: content
        if phase == "train":
            return self.validator.train_reply
        validator = self.validator
        return lambda _name, content: validator.evaluate_reply(content)

    def _refuse(self, msg: Message, name: str, phase: str, reason: str) -> None:
        self.current.failed[self._source(msg)] = f"{phase}: {'update' if phase == 'train' else 'reply'} refused: {reason}"
        _log.warning("site %s: %s %s refused: %s", name, phase, "update" if phase == "train" else "reply", reason)

    # ---- Strategy interface ------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.current = RoundReport()
        if self.validator is not None:
            self.validator.expect(arrays)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._sent = [m.metadata.dst_node_id for m in messages]
        self._sent_msgs = messages
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        answered = {self._source(m) for m in replies}
        accepted, errors = self._split(replies, "train")
        for node in self._sent:
            if node not in answered:
                self.current.failed[node] = "train: no reply within round-timeout (site down or too slow)"
        if not accepted:
            reasons = "; ".join(f"{k}: {last_line(v)}" for k, v in self.round_failures().items())
            if self.current.failed and all(is_refusal(v) for v in self.current.failed.values()):
                raise RunStopped(f"round {server_round}: every sampled site declined on privacy grounds ({reasons})")
            raise AllSitesFailed(
                f"round {server_round}: none of the {len(self._sent)} sampled sites returned an update"
                + (f" ({reasons})" if reasons else "")
            )
        arrays, metrics = self.inner.aggregate_train(server_round, [*accepted, *errors])
        if arrays is None:
            # Flower's accounted central-DP wrappers refuse to aggregate unless every
            # sampled site replied: a declining site then ends the run, cleanly.
            reasons = "; ".join(f"{k}: {last_line(v)}" for k, v in self.round_failures().items())
            if self.current.failed and all(is_refusal(v) for v in self.current.failed.values()):
                raise RunStopped(
                    f"round {server_round}: site(s) declined on privacy grounds and the strategy needs every "
                    f"sampled site (central DP) ({reasons})"
                )
            raise AllSitesFailed(
                f"round {server_round}: the strategy could not aggregate the site updates"
                + (f" (failures: {reasons}; central DP needs every sampled site to reply)" if reasons else "")
            )
        self.current.train_aggregate = dict(metrics or {})
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        self._sent_msgs = [*self._sent_msgs, *messages]
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        accepted, errors = self._split(replies, "evaluate")
        if self.validator is not None and accepted:
            weight = self.validator.weight_key
            if not sum(float(next(iter(m.content.metric_records.values()))[weight]) for m in accepted):  # type: ignore[arg-type]
                return None  # no evaluation image anywhere: nothing to average (Flower would divide by zero)
        metrics = self.inner.aggregate_evaluate(server_round, [*accepted, *errors])
        self.current.evaluate_aggregate = dict(metrics or {})
        return metrics

    def summary(self) -> None:
        self.inner.summary()


def _common_metrics(replies: list[Message]) -> list[Message]:
    """``replies`` with each MetricRecord cut to the keys all of them share.

    Flower's strategies refuse a whole round when the replies' metric keys differ;
    one site reporting a key the others do not must not cost everyone the round.
    """
    if len(replies) < 2:
        return replies
    records = [next(iter(m.content.metric_records.values())) for m in replies]
    common = set.intersection(*(set(r.keys()) for r in records))
    for msg, record in zip(replies, records):
        if set(record.keys()) != common:
            key = next(iter(msg.content.metric_records.keys()))
            msg.content.metric_records[key] = MetricRecord({k: v for k, v in record.items() if k in common})
    return replies
