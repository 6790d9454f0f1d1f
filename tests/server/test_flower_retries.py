"""A site's SuperNode retries the server's internal errors (HTTP 500) a few times, and nothing else."""

from __future__ import annotations

import importlib
import subprocess
import sys

import httpx
import pytest

from fedlens.server import flower_retries


def _server_error(status: int = 500) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "https://127.0.0.1:1/v1/fleet/push-messages")
    response = httpx.Response(status, request=request)
    message = f"Server error '{status}' for url '{request.url}'\nFor more information check: https://developer.mozilla.org/"
    return httpx.HTTPStatusError(message, request=request, response=response)


class _Flaky:
    """Fails with ``errors`` in turn, then answers."""

    def __init__(self, *errors: Exception) -> None:
        self.errors, self.calls = list(errors), 0

    def __call__(self, x: int) -> int:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return x + 1


def test_a_call_the_server_answers_with_500_is_tried_again_after_doubling_waits(caplog):
    waits: list[float] = []
    flaky = _Flaky(_server_error(), _server_error())
    call = flower_retries.retry_on_server_error(flaky, what="send", tries=4, first_wait_s=0.5, sleep=waits.append)
    assert call(1) == 2 and flaky.calls == 3
    assert waits == [0.5, 1.0]
    assert (
        "send: the server answered Server error '500' for url 'https://127.0.0.1:1/v1/fleet/push-messages'; trying again in 0.5 s (1 of 4)"
        in caplog.text
    )
    assert "more information" not in caplog.text  # one line per retry


def test_the_last_try_raises_and_other_errors_are_not_retried():
    waits: list[float] = []
    always = _Flaky(*[_server_error() for _ in range(10)])
    with pytest.raises(httpx.HTTPStatusError):
        flower_retries.retry_on_server_error(always, what="send", tries=3, sleep=waits.append)(1)
    assert always.calls == 3 and len(waits) == 2
    for error in (_server_error(401), ValueError("a bug")):
        once = _Flaky(error)
        with pytest.raises(type(error)):
            flower_retries.retry_on_server_error(once, what="send", sleep=waits.append)(1)
        assert once.calls == 1


# In a fresh interpreter: the adjustment rebinds names in Flower's loop module for the process.
_APPLY = """
import importlib
from fedlens.server.flower_retries import retry_supernode_server_errors
loop = importlib.import_module("flwr.supernode.start_client_internal")
flower_push = loop._push_messages
assert retry_supernode_server_errors() is None, retry_supernode_server_errors()
assert retry_supernode_server_errors() is None  # twice is once
print("wrapped", loop._push_messages.__wrapped__ is flower_push, loop._pull_and_store_message.__fedlens_retries__)
seen = {}
def step(**kwargs):
    seen.update(kwargs)
wrapped = __import__("fedlens.server.flower_retries", fromlist=["_wrapping"])._wrapping(step, ("send", "push_object"))
send = lambda *a: "sent"
wrapped(state=None, send=send, push_object=send)
print("passes-wrapped", seen["send"] is not send, seen["send"]() == "sent", seen["state"] is None)
"""


def test_the_installed_flower_supernode_gets_the_retries():
    proc = subprocess.run([sys.executable, "-c", _APPLY], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrapped True True" in proc.stdout and "passes-wrapped True True True" in proc.stdout, proc.stdout


def test_another_flower_series_is_left_alone_and_says_why(monkeypatch):
    from fedlens.server import flower_waits

    monkeypatch.setattr(flower_waits, "FLOWER_SERIES", "9.99.")
    loop = importlib.import_module("flwr.supernode.start_client_internal")
    before = (loop._push_messages, loop._pull_and_store_message)
    why = flower_retries.retry_supernode_server_errors()
    assert why is not None and "is not 9.99.*" in why
    assert (loop._push_messages, loop._pull_and_store_message) == before
