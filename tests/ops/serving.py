"""A real ``fedlens serve`` process on a free loopback port, for the serve tests (stopped by PID)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from fedlens.ops.procs import Procs, free_port, wait_for


@dataclass
class Server:
    url: str
    procs: Procs

    def log(self) -> str:
        return self.procs.log("serve")

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)  # type: ignore[arg-type]


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v2/health/live", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def serving(model: Path, logs: Path, *args: str) -> Iterator[Server]:
    """Start ``fedlens serve --model MODEL ARGS`` on loopback; yield once it answers; always stop it."""
    port = free_port()
    procs = Procs(logs, {**os.environ, "PYTHONUNBUFFERED": "1"})
    proc = procs.start("serve", "serve", "--model", str(model), "--port", str(port), "--device", "cpu", "--threads", "1", *args)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is not None or _ready(url), 120, "fedlens serve to answer", interval=0.2)
        assert proc.poll() is None, f"fedlens serve exited with {proc.returncode}:\n{procs.log('serve')[-3000:]}"
        yield Server(url, procs)
    finally:
        procs.stop_all()
