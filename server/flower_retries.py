"""A site's SuperNode retries the server's transient internal errors instead of dropping its work.

Flower 1.42's SuperNode retries a request to the server on a lost connection and on HTTP
502, 503 and 504, but not on 500. Its server (the SuperLink) answers 500 to any unexpected
error, and under load that includes its own database being busy (``sqlite3.OperationalError:
database is locked``, measured with 20 sites pushing replies at once on one machine,
docs/benchmarks.md §17). Then:

- a reply whose push got a 500 is dropped: the SuperNode logs ``Failed to send message``
  and deletes it, the site's update never reaches the server, and the round waits for it
  until ``round-timeout`` (an hour by default);
- a 500 on asking for a message ends the SuperNode's message loop: the site stays
  connected but takes no more work.

:func:`retry_supernode_server_errors`, run in the SuperNode process (through
:mod:`fedlens.ops.flower_supernode`), wraps the functions the SuperNode's loop uses to
talk to the server (ask for a message, fetch its run, app and content, confirm it, push a
reply and its content) so that each call that gets a 500 is tried again, up to
:data:`TRIES` times in all, after 0.5, 1, 2... s (:data:`FIRST_WAIT_S`, doubling). A call
that fails for any other reason, or still gets a 500 on its last try, fails as it did.
Each retry is logged. It rebinds two names in Flower's loop module
(``_pull_and_store_message`` and ``_push_messages``) to wrappers that pass Flower's own
functions, wrapped, to Flower's own; it applies only to the Flower series it was read from
and only while those functions take the arguments it wraps; otherwise it changes nothing
and returns why, for the process to log.

A retried push is safe: the SuperLink stores nothing of a push that failed before it
stored the message (the 500s seen came from opening the push's session, before that); a
push retried after the message was stored is refused as a duplicate, with an error the
site logs, as before.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

from .flower_waits import FLOWER_SERIES, supernode_loop

__all__ = ["FIRST_WAIT_S", "TRIES", "retry_on_server_error", "retry_supernode_server_errors"]

_log = logging.getLogger("fedlens.site.supernode")

# Tries per call in all (the first and up to 5 retries), and the wait before the first retry
# (then doubling: 0.5 + 1 + 2 + 4 + 8 = 15.5 s of waiting at most).
TRIES = 6
FIRST_WAIT_S = 0.5

# The server-facing functions each loop step takes, as Flower 1.42 names them.
_PULL_ARGS = ("receive", "get_run", "get_fab", "pull_object", "confirm_message_received")
_PUSH_ARGS = ("send", "push_object")


def _is_server_error(exc: BaseException) -> bool:
    import httpx

    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 500


def retry_on_server_error(
    fn: Callable[..., Any],
    *,
    what: str,
    tries: int = TRIES,
    first_wait_s: float = FIRST_WAIT_S,
    is_transient: Callable[[BaseException], bool] = _is_server_error,
    sleep: Callable[[float], None] = time.sleep,
) -> Callable[..., Any]:
    """``fn``, called again after a wait when it raises an error ``is_transient`` accepts.

    Parameters
    ----------
    fn : callable
        The call to protect.
    what : str
        What the call does, for the log.
    tries : int
        Calls in all before the last error is raised.
    first_wait_s : float
        Seconds before the first retry; each further wait doubles.
    is_transient : callable
        Which errors are worth a retry (default: an HTTP 500 from the server).
    sleep : callable
        Waits the given seconds.

    Returns
    -------
    callable
        Takes and returns what ``fn`` does.
    """

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        wait = first_wait_s
        for attempt in range(1, tries):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                answer = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                _log.warning("%s: the server answered %s; trying again in %.1f s (%d of %d)", what, answer, wait, attempt, tries)
                sleep(wait)
                wait *= 2
        return fn(*args, **kwargs)  # the last try: its error is the caller's

    return call


def _wrapping(step: Callable[..., Any], names: tuple[str, ...], **options: Any) -> Callable[..., Any]:
    @functools.wraps(step)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        for name in names:
            kwargs[name] = retry_on_server_error(kwargs[name], what=name.replace("_", " "), **options)
        return step(*args, **kwargs)

    wrapped.__fedlens_retries__ = True  # type: ignore[attr-defined]
    return wrapped


def retry_supernode_server_errors(**options: Any) -> str | None:
    """In this (SuperNode) process: retry the server's HTTP 500s (see the module's description).

    Parameters
    ----------
    **options
        Passed to :func:`retry_on_server_error` (``tries``, ``first_wait_s``).

    Returns
    -------
    str or None
        None when applied; otherwise why not (then nothing was changed).
    """
    loop = supernode_loop()
    if isinstance(loop, str):
        return loop
    module, source = loop
    steps = {"_pull_and_store_message": _PULL_ARGS, "_push_messages": _PUSH_ARGS}
    for name, args in steps.items():
        step = getattr(module, name, None)
        if step is None:
            return f"{module.__name__}.{name} is gone (read from Flower {FLOWER_SERIES}*)"
        if getattr(step, "__fedlens_retries__", False):
            return None  # applied before in this process
        missing = [a for a in args if a not in inspect.signature(step).parameters]
        if missing:
            return f"{module.__name__}.{name} no longer takes {', '.join(missing)}"
    # Flower's loop passes these by keyword; a positional call would bypass the wrappers.
    for name, args in steps.items():
        if not all(f"{a}={a}" in source for a in args):
            return f"{module.__name__} no longer passes {', '.join(args)} to {name} by keyword"
    for name, args in steps.items():
        setattr(module, name, _wrapping(getattr(module, name), args, **options))
    return None
