"""Flower 1.42's fixed waits, shortened in the processes fedlens starts or runs its app in.

A deployed round is two exchanges (train, then evaluate), and in Flower 1.42 each one
waits on constants that no flag, environment variable or argument sets:

- a site's SuperNode asks the server for a message, and when none is waiting sleeps
  3 s before asking again (``time.sleep(3)`` in ``flwr.supernode.start_client_internal``);
  once it has one, it checks every 0.5 s whether the site's answer is ready
  (``time.sleep(0.5)``, twice in that module);
- the ServerApp's grid asks for replies every 3 s (``HttpGrid.send_and_receive``);
  fedlens' server waits with its own :class:`~fedlens.server.sites.ShortPollGrid`
  instead, built on the public Grid API, so nothing is adjusted for it here;
- a message can be pulled before its content has finished uploading; the puller then
  waits 1 s, then 2 s, 4 s... before asking for the content again (``initial_backoff``
  of ``flwr.supercore.inflatable.inflatable_utils.pull_objects``, default 1 s). With
  the 3 s polls this was rare; with short polls it happens to most messages.

:func:`shorten_supernode_waits` (run in the SuperNode process, through
:mod:`fedlens.ops.flower_supernode`) and :func:`shorten_serverapp_waits` (run by the
ServerApp when fedlens' app starts a deployed run) shorten them. Each adjustment rebinds
one name inside one Flower module: ``time`` in the SuperNode's loop module, to a
stand-in whose ``sleep(3)`` sleeps :data:`MESSAGE_POLL_S` and ``sleep(0.5)``
:data:`REPLY_POLL_S` (those are the module's only sleeps); ``pull_objects`` in that
module and in the grid's module, to Flower's own function with ``initial_backoff``
:data:`PULL_BACKOFF_S`. Nothing else changes: TLS, site authentication, the messages
and their checks are Flower's. Each applies only to the Flower series it was read from
(:data:`FLOWER_SERIES`) and only while the names it rebinds are still what they were;
otherwise it changes nothing and returns why, for the process to log.
``tests/server/test_flower_waits.py`` fails then, so an upgrade of Flower cannot bring
the 3 s back unnoticed.
"""

from __future__ import annotations

import collections
import functools
import importlib
import importlib.metadata
import inspect
import re
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["FLOWER_SERIES", "MESSAGE_POLL_S", "REPLY_POLL_S", "PULL_BACKOFF_S", "shorten_supernode_waits", "shorten_serverapp_waits"]

# The Flower release series whose code these adjustments were read from.
FLOWER_SERIES = "1.42."
# Seconds between a SuperNode's asks for a message while none is waiting. Each ask is one
# signed HTTPS request to the server: a site makes 2 a second while idle (Flower: 1 every
# 3 s), and a message waits 0.25 s on average to be picked up (Flower: 1.5 s).
MESSAGE_POLL_S = 0.5
# Seconds between the SuperNode's checks for the site's answer to a message. A check reads
# the SuperNode's own memory: nothing goes over the network (Flower: 0.5 s).
REPLY_POLL_S = 0.1
# First wait before asking again for content that is still uploading (Flower: 1 s; the
# doubling, the 10 s cap and the 500 tries stay Flower's).
PULL_BACKOFF_S = 0.1

_SUPERNODE_LOOP = "flwr.supernode.start_client_internal"
_GRID = "flwr.superlink.grid.http_grid"
# Every `time.sleep` call in the SuperNode's loop module, as Flower 1.42 writes them.
_FLOWER_SLEEPS = collections.Counter({"3": 1, "0.5": 2})


class _ShortPoll:
    """Stands in for :mod:`time` in one Flower module: shorter fixed sleeps; all else is :mod:`time`.

    ``waits`` maps Flower's seconds to ours (``{3: 0.5, 0.5: 0.1}``); any other sleep is
    unchanged.
    """

    def __init__(self, waits: dict[float, float]) -> None:
        self.waits = waits

    def sleep(self, seconds: float) -> None:
        time.sleep(self.waits.get(seconds, seconds))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def _flower_pull_objects() -> Callable[..., Any]:
    from flwr.supercore.inflatable import inflatable_utils

    return inflatable_utils.pull_objects


def _version_refusal() -> str | None:
    version = importlib.metadata.version("flwr")
    if not version.startswith(FLOWER_SERIES):
        return f"Flower {version} is not {FLOWER_SERIES}*, the series these adjustments were read from"
    return None


def _pull_backoff_refusal(module: ModuleType) -> str | None:
    current = getattr(module, "pull_objects", None)
    flower = _flower_pull_objects()
    if isinstance(current, functools.partial) and current.func is flower:
        return None  # adjusted before in this process
    if current is not flower or "initial_backoff" not in inspect.signature(flower).parameters:
        return f"{module.__name__}.pull_objects is no longer Flower's pull_objects(..., initial_backoff=...)"
    return None


def _set_pull_backoff(module: ModuleType, backoff_s: float) -> None:
    module.pull_objects = functools.partial(_flower_pull_objects(), initial_backoff=backoff_s)


def shorten_supernode_waits(
    *, poll_s: float = MESSAGE_POLL_S, reply_poll_s: float = REPLY_POLL_S, backoff_s: float = PULL_BACKOFF_S
) -> str | None:
    """In this (SuperNode) process: ask for messages every ``poll_s`` s, check for the site's
    answer every ``reply_poll_s`` s, retry content still uploading after ``backoff_s`` s.

    Returns
    -------
    str or None
        None when applied; otherwise why not (then nothing was changed).
    """
    if why := _version_refusal():
        return why
    module = importlib.import_module(_SUPERNODE_LOOP)
    if not isinstance(module.time, _ShortPoll):
        try:
            source = inspect.getsource(module)
        except (OSError, TypeError) as exc:
            return f"cannot read the source of {module.__name__} ({exc})"
        sleeps = collections.Counter(re.findall(r"\btime\.sleep\(([^)]*)\)", source))
        if module.time is not time or sleeps != _FLOWER_SLEEPS:
            return f"the sleeps in {module.__name__} are no longer Flower 1.42's (found {dict(sleeps)})"
    if why := _pull_backoff_refusal(module):
        return why
    module.time = _ShortPoll({3: poll_s, 0.5: reply_poll_s})
    _set_pull_backoff(module, backoff_s)
    return None


def shorten_serverapp_waits(*, backoff_s: float = PULL_BACKOFF_S) -> str | None:
    """In this (ServerApp) process: the grid retries a reply's content after ``backoff_s`` s.

    Returns
    -------
    str or None
        None when applied; otherwise why not (then nothing was changed).
    """
    if why := _version_refusal():
        return why
    module = importlib.import_module(_GRID)
    if why := _pull_backoff_refusal(module):
        return why
    _set_pull_backoff(module, backoff_s)
    return None
