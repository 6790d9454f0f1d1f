"""Flower 1.42's fixed waits, shortened: the adjustments apply to the installed Flower, or say why not.

If one of these fails after an upgrade of Flower, the deployed rounds have silently gone
back to Flower's 3 s polls: read the new Flower's loop (`flwr/supernode/start_client_internal.py`,
`flwr/superlink/grid/http_grid.py`) and adapt `fedlens/server/flower_waits.py`.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import time

import pytest

from fedlens.server import flower_waits

# Run in a fresh interpreter: the adjustments rebind names inside Flower's modules for the
# whole process, and the test process should keep Flower's own.
_APPLY = """
import importlib, time
from fedlens.server.flower_waits import shorten_serverapp_waits, shorten_supernode_waits
from flwr.supercore.inflatable.inflatable_utils import pull_objects
assert shorten_supernode_waits() is None, shorten_supernode_waits()
assert shorten_serverapp_waits() is None, shorten_serverapp_waits()
loop = importlib.import_module("flwr.supernode.start_client_internal")
grid = importlib.import_module("flwr.superlink.grid.http_grid")
pacer = loop.time.pacer  # Flower's loop calls time.sleep(3) and time.sleep(0.5)
print("idle-poll", pacer.wait_s())  # a SuperNode starts idle
print("reply-poll", loop.time.reply_poll_s)
pacer.mark_busy()
print("message-poll", pacer.wait_s())
print("time.time", loop.time.time is time.time)
for name, module in (("supernode", loop), ("grid", grid)):
    print(name, module.pull_objects.func is pull_objects, module.pull_objects.keywords["initial_backoff"])
"""


def test_the_installed_flower_gets_every_shortened_wait():
    proc = subprocess.run([sys.executable, "-c", _APPLY], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert float(out["message-poll"]) == flower_waits.MESSAGE_POLL_S
    assert float(out["idle-poll"]) == flower_waits.IDLE_POLL_S == 3.0  # Flower's own while idle
    assert float(out["reply-poll"]) == flower_waits.REPLY_POLL_S
    assert out["time.time"] == "True"  # every other use of `time` is the real module
    assert out["supernode"] == out["grid"] == f"True {flower_waits.PULL_BACKOFF_S}"


def test_another_flower_series_is_left_alone_and_says_why(monkeypatch):
    monkeypatch.setattr(flower_waits, "FLOWER_SERIES", "9.99.")
    loop = importlib.import_module("flwr.supernode.start_client_internal")
    grid = importlib.import_module("flwr.superlink.grid.http_grid")
    before = (loop.time, loop.pull_objects, grid.pull_objects)
    for shorten in (flower_waits.shorten_supernode_waits, flower_waits.shorten_serverapp_waits):
        why = shorten()
        assert why is not None and "is not 9.99.*" in why
    assert (loop.time, loop.pull_objects, grid.pull_objects) == before and loop.time is time


def test_a_loop_whose_sleeps_changed_is_left_alone_and_says_why(monkeypatch):
    # Flower's in-memory grid polls with `time.sleep(self.pull_interval)`: not the SuperNode
    # loop this was read from, as a changed loop in a new Flower would not be either.
    monkeypatch.setattr(flower_waits, "_SUPERNODE_LOOP", "flwr.superlink.grid.inmemory_grid")
    other = importlib.import_module("flwr.superlink.grid.inmemory_grid")
    why = flower_waits.shorten_supernode_waits()
    assert why is not None and "no longer Flower 1.42's" in why and "self.pull_interval" in why
    assert other.time is time and not hasattr(other, "pull_objects")


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_pacer_asks_often_only_while_at_work():
    clock = _Clock()
    pacer = flower_waits.Pacer(busy_s=0.5, idle_s=3.0, active_s=120.0, clock=clock)
    assert pacer.wait_s() == 3.0  # never at work yet
    pacer.mark_busy()
    clock.now += 119.9
    assert pacer.wait_s() == 0.5
    clock.now += 0.2
    assert pacer.wait_s() == 3.0 and not pacer.busy
    pacer.mark_busy()
    assert pacer.busy and pacer.wait_s() == 0.5


def test_the_supernode_stand_in_marks_work_on_the_reply_wait_only():
    clock = _Clock()
    pacer = flower_waits.Pacer(busy_s=0.0, idle_s=0.01, active_s=60.0, clock=clock)
    stand_in = flower_waits._SitePoll(pacer, reply_poll_s=0.0)
    stand_in.sleep(3)  # no message waiting: stays idle
    assert not pacer.busy
    stand_in.sleep(0.5)  # Flower waits 0.5 s only while its site answers a message
    assert pacer.busy
    clock.now += 61
    assert not pacer.busy
    assert stand_in.monotonic is time.monotonic  # everything else is the real `time`


def test_a_pacer_refuses_to_wait_longer_at_work_than_idle():
    with pytest.raises(ValueError, match=r"busy_s=5.0, idle_s=3.0"):
        flower_waits.Pacer(busy_s=5.0, idle_s=3.0, active_s=1.0)
