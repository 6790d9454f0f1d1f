"""The site's side of SecAgg+ (secure aggregation), for fedlens' train handler.

Flower 1.42's ``secaggplus_mod`` speaks the legacy ``fitins.*``/``fitres.*``
record layout, so it cannot sit in front of a Message-API handler. Instead the
train handler passes SecAgg+ messages to :func:`handle_secagg`, which runs the
mod around a small legacy-style handler. This module is the one place on the
client that touches the legacy API.

The mod answers four messages per round; training happens only in the third
(``collect_masked_vectors``). Its reply carries the masked, quantised update and,
in plaintext, the number of examples, the site's metrics (``fitres.metrics``)
and its name (the ``site`` record) — the server reads per-site privacy metrics
such as epsilon from there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat

from fedlens.shared.protocol import PARAM_NAMES_KEY, SITE_RECORD

__all__ = ["is_secagg_message", "handle_secagg"]

_log = logging.getLogger("fedlens.client.secagg")

TrainFn = Callable[[dict[str, torch.Tensor], dict[str, object]], tuple[dict[str, torch.Tensor], int, dict[str, float], str]]


def is_secagg_message(msg: Message) -> bool:
    """Whether ``msg`` is a step of the SecAgg+ protocol.

    Parameters
    ----------
    msg : Message
        A message received by the ClientApp.

    Returns
    -------
    bool
        True for the four kinds of train message of Flower's SecAgg+ workflow.
    """
    return msg.metadata.message_type == MessageType.TRAIN and msg.has_content() and RECORD_KEY_CONFIGS in msg.content.config_records


def _check_update(site: str, names: list[str], received: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> None:
    if list(new) != names:
        raise ValueError(f"site {site!r}: train returned arrays {list(new)}, expected {names} in this order")
    for name in names:
        if new[name].shape != received[name].shape or new[name].dtype != received[name].dtype:
            raise ValueError(
                f"site {site!r}: {name!r} came back as {new[name].dtype} {tuple(new[name].shape)}, "
                f"expected {received[name].dtype} {tuple(received[name].shape)}"
            )


def _check_range(site: str, arrays: list[np.ndarray], num_examples: int, context: Context) -> None:
    """Refuse an update that SecAgg+ would clip (it clips silently otherwise)."""
    if num_examples < 1:
        raise ValueError(f"site {site!r}: SecAgg+ weights updates by the number of examples, got {num_examples}")
    state = SecAggPlusState(**context.state.config_records[RECORD_KEY_STATE])
    scale = num_examples / state.max_weight
    largest = max(float(np.abs(a).max()) for a in arrays if a.size) if any(a.size for a in arrays) else 0.0
    if largest * scale > state.clipping_range:
        raise ValueError(
            f"site {site!r}: SecAgg+ would clip this update: largest |value| {largest:.4g} x weight "
            f"{num_examples}/{state.max_weight:g} exceeds the clipping range {state.clipping_range:g}. "
            "Raise the server's clipping_range."
        )


def handle_secagg(msg: Message, context: Context, train: TrainFn) -> Message:
    """Answer one SecAgg+ message; train only when the protocol asks for the update.

    Parameters
    ----------
    msg : Message
        A message for which :func:`is_secagg_message` is true.
    context : Context
        The node's context; the protocol keeps its keys and shares in its state.
    train : callable
        ``train(state, config) -> (new_state, num_examples, metrics, site_name)``.
        ``state`` maps the parameter names, in the server's order, to tensors;
        ``config`` is the server's train config (``"server-round"`` included).
        ``new_state`` must have the same names, order, shapes and dtypes.
        Called once per round, in the ``collect_masked_vectors`` stage.

    Returns
    -------
    Message
        The reply for the current stage.

    Raises
    ------
    ValueError
        When ``train`` returns other names, shapes or dtypes than it received, no
        examples, or values SecAgg+ would clip.
    """

    def fit(fit_msg: Message, ctx: Context) -> Message:
        content = fit_msg.content
        config: dict[str, object] = dict(content.config_records["fitins.config"])
        names = [str(n) for n in config.pop(PARAM_NAMES_KEY)]  # type: ignore[attr-defined]
        received = content.array_records["fitins.parameters"]
        arrays = [bytes_to_ndarray(array.data) for array in received.values()]
        state = {name: torch.from_numpy(array) for name, array in zip(names, arrays, strict=True)}
        new_state, num_examples, metrics, site = train(state, config)
        _check_update(site, names, state, new_state)
        updated = [new_state[name].detach().cpu().numpy() for name in names]
        _check_range(site, updated, num_examples, ctx)
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(updated), int(num_examples), {k: float(v) for k, v in metrics.items()})
        out = compat.fitres_to_recorddict(fitres, keep_input=False)
        out.config_records[SITE_RECORD] = ConfigRecord({"name": site})
        _log.debug("site %s: round %s trained on %d examples", site, config.get("server-round"), num_examples)
        return Message(out, reply_to=fit_msg)

    return secaggplus_mod(msg, context, fit)
