"""Flower 1.42's fixed waits, shortened in the processes fedlens starts or runs its app in.

A deployed round is two exchanges (train, then evaluate), and in Flower 1.42 each one
waits on constants that no flag, environment variable or argument sets:

- a site's SuperNode asks the server for a message, and when none is waiting sleeps
  3 s before asking again (``time.sleep(3)`` in ``flwr.supernode.start_client_internal``);
  once it has one, it checks every 0.5 s whether the site's answer is ready
  (``time.sleep(0.5)``, twice in that module); fedlens asks every :data:`MESSAGE_POLL_S`
  while the site is at work (a message within the last :data:`ACTIVE_S`), and at Flower's
  3 s otherwise, so an idle site costs the server and itself what a Flower site costs;
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
stand-in whose ``sleep(3)`` sleeps :data:`MESSAGE_POLL_S` while the site is at work and
:data:`IDLE_POLL_S` otherwise, and whose ``sleep(0.5)`` sleeps :data:`REPLY_POLL_S` and
marks the site at work (the loop calls it only while a message is being answered; those
are the module's only sleeps); ``pull_objects`` in that
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
import math
import re
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = [
    "ACTIVE_S",
    "FLOWER_SERIES",
    "IDLE_POLL_S",
    "MESSAGE_POLL_S",
    "PULL_BACKOFF_S",
    "REPLY_POLL_S",
    "Pacer",
    "shorten_serverapp_waits",
    "shorten_supernode_waits",
    "supernode_loop",
]

# The Flower release series whose code these adjustments were read from.
FLOWER_SERIES = "1.42."
# Seconds between a SuperNode's asks for a message while none is waiting and the site is at
# work. Each ask is one signed HTTPS request to the server: a site at work makes 2 a second
# (Flower: 1 every 3 s), and a message waits 0.25 s on average to be picked up (Flower: 1.5 s).
MESSAGE_POLL_S = 0.5
# Seconds between those asks once the site is idle: Flower's own. An idle site's asks cost
# the server and the site CPU (measured: 1.5 % of a server core per site at 0.5 s), so
# sites that have not trained for a while ask at Flower's rate; the first message after
# idling waits 1.5 s on average to be picked up, the rest 0.25 s.
IDLE_POLL_S = 3.0
# A site is at work for this many seconds after its last message: longer than a round in
# which it is not sampled, on the federations measured (docs/benchmarks.md §17).
ACTIVE_S = 120.0
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


class Pacer:
    """How long to wait before asking again: ``busy_s`` while at work, ``idle_s`` once idle.

    At work means :meth:`mark_busy` was called within the last ``active_s`` seconds.

    Parameters
    ----------
    busy_s, idle_s : float
        Seconds between asks while at work and while idle.
    active_s : float
        Seconds a :meth:`mark_busy` keeps the pacer at work.
    clock : callable, default time.monotonic
        Seconds, monotonic.
    """

    def __init__(self, *, busy_s: float, idle_s: float, active_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 <= busy_s <= idle_s:
            raise ValueError(f"a pacer waits less at work than idle (busy_s={busy_s}, idle_s={idle_s})")
        self.busy_s, self.idle_s, self.active_s = busy_s, idle_s, active_s
        self._clock = clock
        self._busy_at = -math.inf

    def mark_busy(self) -> None:
        self._busy_at = self._clock()

    @property
    def busy(self) -> bool:
        return self._clock() - self._busy_at < self.active_s

    def wait_s(self) -> float:
        """Seconds to wait before the next ask."""
        return self.busy_s if self.busy else self.idle_s


class _SitePoll:
    """Stands in for :mod:`time` in the SuperNode's loop module; all else is :mod:`time`.

    Flower's loop sleeps 3 s when no message is waiting (here: ``pacer.wait_s()``) and
    0.5 s while the site answers a message (here: ``reply_poll_s``, and the site is at
    work). Any other sleep is unchanged.
    """

    def __init__(self, pacer: Pacer, *, reply_poll_s: float) -> None:
        self.pacer = pacer
        self.reply_poll_s = reply_poll_s

    def sleep(self, seconds: float) -> None:
        if seconds == 3:
            seconds = self.pacer.wait_s()
        elif seconds == 0.5:
            self.pacer.mark_busy()
            seconds = self.reply_poll_s
        time.sleep(seconds)

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


def supernode_loop() -> tuple[ModuleType, str] | str:
    """Flower's SuperNode loop module and its source, or why fedlens leaves it alone.

    Returns
    -------
    (module, str) or str
        The module and its source text; otherwise why not (another Flower series, or a
        source that cannot be read).
    """
    if why := _version_refusal():
        return why
    module = importlib.import_module(_SUPERNODE_LOOP)
    try:
        return module, inspect.getsource(module)
    except (OSError, TypeError) as exc:
        return f"cannot read the source of {module.__name__} ({exc})"


def _set_pull_backoff(module: ModuleType, backoff_s: float) -> None:
    module.pull_objects = functools.partial(_flower_pull_objects(), initial_backoff=backoff_s)


def shorten_supernode_waits(
    *,
    poll_s: float = MESSAGE_POLL_S,
    idle_poll_s: float = IDLE_POLL_S,
    active_s: float = ACTIVE_S,
    reply_poll_s: float = REPLY_POLL_S,
    backoff_s: float = PULL_BACKOFF_S,
) -> str | None:
    """In this (SuperNode) process: ask for messages every ``poll_s`` s while at work (a
    message within the last ``active_s`` s) and every ``idle_poll_s`` s otherwise, check for
    the site's answer every ``reply_poll_s`` s, retry content still uploading after
    ``backoff_s`` s.

    Returns
    -------
    str or None
        None when applied; otherwise why not (then nothing was changed).
    """
    loop = supernode_loop()
    if isinstance(loop, str):
        return loop
    module, source = loop
    if not isinstance(module.time, _SitePoll):
        sleeps = collections.Counter(re.findall(r"\btime\.sleep\(([^)]*)\)", source))
        if module.time is not time or sleeps != _FLOWER_SLEEPS:
            return f"the sleeps in {module.__name__} are no longer Flower 1.42's (found {dict(sleeps)})"
    if why := _pull_backoff_refusal(module):
        return why
    module.time = _SitePoll(Pacer(busy_s=poll_s, idle_s=idle_poll_s, active_s=active_s), reply_poll_s=reply_poll_s)
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
