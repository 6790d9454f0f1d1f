"""Processes fedlens starts (servers, sites): started here, always stopped here, by PID.

Flower's SuperLink and SuperNode start detached children (SuperExec, app
processes), so stopping a process first snapshots its whole tree from ``/proc`` and
then signals every PID in it. Nothing is ever killed by name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fedlens.shared.errors import FedlensError
from fedlens.shared.protocol import FLOWER_ENV

__all__ = ["Procs", "flower_bin", "flower_env", "free_port", "listening", "tree", "wait_for"]


def flower_bin(name: str) -> str:
    """Path of a Flower executable installed next to this Python (the same environment)."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise FedlensError(f"{name} not found next to {sys.executable}; install fedlens with `pip install -e .` in this environment")
    return str(path)


def flower_env(**extra: str) -> dict[str, str]:
    """Environment for Flower processes: no telemetry, no update check, no runtime installs.

    The environment's ``bin`` goes first on ``PATH`` because the SuperLink and
    SuperNode start ``flower-superexec`` and the app processes by name.
    """
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(FLOWER_ENV, PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on loopback ``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out.setdefault(ppid, []).append(int(entry))
    return out


def _start_time(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants alive now."""
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class Procs:
    """Start ``fedlens`` commands as processes; :meth:`stop_all` ends every one of them."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.env = env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.seen: dict[int, int | None] = {}  # every PID of every tree we looked at -> its start time
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedlens.ops.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def snapshot(self) -> None:
        """Remember the current trees (call while they are alive, e.g. during a run)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                self.seen.update({p: _start_time(p) for p in tree(proc.pid)})

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs[name]
        pids = tree(proc.pid) if proc.poll() is None else []
        self.seen.update({p: _start_time(p) for p in pids})
        for pid in pids:
            self._signal(pid, sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            for pid in tree(proc.pid):
                self.seen.setdefault(pid, _start_time(pid))
                self._signal(pid, signal.SIGKILL)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._reap(pids)

    def _signal(self, pid: int, sig: int) -> None:
        """Signal ``pid`` only if it is still the process we saw (not a reused PID)."""
        if _start_time(pid) != self.seen.get(pid):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        self.snapshot()
        for name in list(self.procs):
            try:
                self.stop(name)
            except Exception:  # keep stopping the others
                pass
        self._reap(list(self.seen))

    def _reap(self, pids: list[int]) -> None:
        """Wait for ``pids`` to exit; SIGKILL the ones still alive (same process, not a reused PID)."""
        deadline = time.monotonic() + 10
        for pid in pids:
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.2)
            if _alive(pid):
                self._signal(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
