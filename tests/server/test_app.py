"""The ServerApp's wait for a local simulation's sites before round 1."""

from __future__ import annotations

import logging
import time

from fedlens.server.app import _await_sites


class ArrivingGrid:
    """Node ids as a simulation registers them: one more every ``every`` seconds, up to ``total``."""

    def __init__(self, total: int, every: float) -> None:
        self.total, self.every, self.start = total, every, time.monotonic()

    def get_node_ids(self) -> list[int]:
        arrived = min(self.total, 1 + int((time.monotonic() - self.start) / self.every))
        return list(range(100, 100 + arrived))


def test_waits_until_every_expected_site_is_connected():
    grid = ArrivingGrid(total=4, every=0.1)
    _await_sites(grid, 4, wait_s=10.0)
    assert len(grid.get_node_ids()) == 4
    assert time.monotonic() - grid.start >= 0.3


def test_gives_up_after_the_wait_and_says_how_many_came(caplog):
    grid = ArrivingGrid(total=2, every=0.01)
    with caplog.at_level(logging.WARNING, logger="fedlens.server"):
        began = time.monotonic()
        _await_sites(grid, 5, wait_s=0.5)
    assert 0.5 <= time.monotonic() - began < 5.0
    assert "only 2 of 5 sites connected" in caplog.text
