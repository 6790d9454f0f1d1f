"""Flower's SuperNode as ``fedlens client start`` runs it: Flower's own main, with shorter fixed waits.

::

    python -m fedlens.ops.flower_supernode [flower-supernode arguments]

Before it runs ``flower-supernode``'s main with the arguments given, it shortens the
SuperNode's fixed waits while the site is at work: 3 s between asks for a message, 0.5 s
between checks for the site's answer, 1 s before asking again for content still uploading
(:func:`fedlens.server.flower_waits.shorten_supernode_waits`). An idle site asks for
messages every 3 s, as Flower's does. It also retries a request the server answers with an
internal error (:func:`fedlens.server.flower_retries.retry_supernode_server_errors`). On a
Flower they were not read from they change nothing and log why; the SuperNode then runs
with Flower's own waits and retries.
"""

from __future__ import annotations

import logging
import sys

from fedlens.server.flower_retries import TRIES, retry_supernode_server_errors
from fedlens.server.flower_waits import ACTIVE_S, IDLE_POLL_S, MESSAGE_POLL_S, PULL_BACKOFF_S, REPLY_POLL_S, shorten_supernode_waits

__all__ = ["main"]

_log = logging.getLogger("fedlens.site.supernode")


def main() -> None:
    """Run ``flower-supernode`` with the arguments given, with the shorter waits where they apply."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    _log.addHandler(handler)
    _log.setLevel(logging.INFO)
    _log.propagate = False
    why_not = shorten_supernode_waits()
    if why_not is None:
        _log.info(
            "SuperNode waits: asks for messages every %.1f s while at work (a message in the last %.0f s), "
            "every %.1f s when idle; checks for the site's answer every %.1f s, "
            "retries content still uploading after %.1f s (Flower's own: 3 s, 0.5 s, 1 s)",
            MESSAGE_POLL_S,
            ACTIVE_S,
            IDLE_POLL_S,
            REPLY_POLL_S,
            PULL_BACKOFF_S,
        )
    else:
        _log.warning("SuperNode waits left at Flower's own (messages every 3 s): %s", why_not)
    why_not = retry_supernode_server_errors()
    if why_not is None:
        _log.info("SuperNode retries: a request the server answers with an internal error (500) is tried up to %d times", TRIES)
    else:
        _log.warning("SuperNode retries left at Flower's own (none on a server's internal error): %s", why_not)
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
