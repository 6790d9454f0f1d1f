"""Waiting for sites to connect before a round."""

from __future__ import annotations

import logging
import time

from flwr.serverapp import Grid

__all__ = ["wait_for_sites"]

_log = logging.getLogger("fedlens.server")


def wait_for_sites(grid: Grid, expected: int, *, wait_s: float) -> set[int]:
    """Poll ``grid`` until ``expected`` sites are connected or ``wait_s`` passed; return the connected node ids."""
    deadline = time.monotonic() + wait_s
    last_log = 0.0
    while len(nodes := set(grid.get_node_ids())) < expected and (now := time.monotonic()) < deadline:
        if now - last_log >= 10.0:
            _log.info("waiting for sites: %d of %d connected", len(nodes), expected)
            last_log = now
        time.sleep(0.2)
    return nodes
