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

__all__ = [
    "ChildExited",
    "Procs",
    "Supervisor",
    "die_with_parent",
    "flower_bin",
    "flower_env",
    "free_port",
    "listening",
    "tree",
    "wait_for",
]


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


def die_with_parent() -> Callable[[], None] | None:
    """Linux: a ``preexec_fn`` that has the kernel SIGTERM the child when its parent dies (even by SIGKILL).

    libc is looked up here, in the parent: the function runs between fork and exec,
    where importing a module could deadlock on a lock another thread held.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    sigterm = int(signal.SIGTERM)

    def set_death_signal() -> None:  # pragma: no cover - runs in the child
        prctl(1, sigterm)  # PR_SET_PDEATHSIG

    return set_death_signal


class ChildExited(FedlensError):
    """A supervised process ended on its own."""


class Supervisor:
    """Run several long-lived processes as one service: relay their output, stop them together.

    Each child gets its own session (a terminal's Ctrl-C reaches only the
    supervisor, which then stops the children in order), is told by the kernel to stop
    when the supervisor dies, and has its output copied line by line to the
    supervisor's stderr, the last lines kept for a crash report. Stopping signals
    every process of every child's tree (snapshotted while they run, so grandchildren
    a child left behind are found too), never anything by name.
    """

    def __init__(self, env: dict[str, str], keep_lines: int = 40) -> None:
        import collections
        import threading

        self.env = env
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.recent: dict[str, collections.deque[str]] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._keep = keep_lines
        self._seen: dict[int, int | None] = {}
        self.stopping = threading.Event()

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        """Start ``cmd`` as the child called ``name`` (used in log lines and reports)."""
        import collections
        import threading

        proc = subprocess.Popen(
            cmd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        self.children[name] = proc
        self.recent[name] = collections.deque(maxlen=self._keep)
        thread = threading.Thread(target=self._relay, args=(name, proc), name=f"relay-{name}", daemon=True)
        thread.start()
        self._threads[name] = thread
        self.snapshot()
        return proc

    def _relay(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", errors="replace")
            self.recent[name].append(line.rstrip("\n"))
            try:
                sys.stderr.write(line)
                sys.stderr.flush()
            except (OSError, ValueError):
                pass

    def snapshot(self) -> None:
        """Remember every process of every child's tree (call now and then while they run)."""
        for proc in self.children.values():
            if proc.poll() is None:
                for pid in tree(proc.pid):
                    self._seen.setdefault(pid, _start_time(pid))

    def exited(self) -> tuple[str, int] | None:
        """The first child that has ended, with its exit code (negative: killed by that signal)."""
        for name, proc in self.children.items():
            code = proc.poll()
            if code is not None:
                return name, code
        return None

    def wait_ready(self, name: str, check: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait until ``check()`` holds; raise :class:`ChildExited` if any child ends first.

        Raises
        ------
        ChildExited
            When a child ended before ``check`` held, with its last output lines.
        TimeoutError
            When ``check`` did not hold within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while not check():
            if ended := self.exited():
                raise ChildExited(self.report(*ended))
            if self.stopping.is_set():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not become ready ({what}) within {timeout:.0f}s; its last lines:\n{self._tail(name)}")
            time.sleep(0.2)

    def watch(self, interval: float = 1.0) -> tuple[str, int] | None:
        """Block until a child ends (returned with its exit code) or :attr:`stopping` is set (None)."""
        while not self.stopping.wait(interval):
            if ended := self.exited():
                return ended
            self.snapshot()
        return None

    def report(self, name: str, code: int) -> str:
        """One paragraph saying that child ``name`` ended, how, and its last lines."""
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        self._threads[name].join(timeout=2)  # let the relay thread take in what the child wrote last
        return f"{name} (pid {self.children[name].pid}) {how}; its last lines:\n{self._tail(name)}"

    def _tail(self, name: str) -> str:
        return "\n".join(f"    {line}" for line in list(self.recent.get(name, ()))[-15:]) or "    (no output)"

    def stop_all(self, order: list[str] | None = None, grace: float = 20.0) -> None:
        """SIGTERM every child's tree (in ``order``, then the rest), wait, SIGKILL what is left."""
        self.snapshot()
        names = [*(order or []), *(n for n in self.children if n not in (order or []))]
        for name in names:
            proc = self.children.get(name)
            if proc is None:
                continue
            pids = tree(proc.pid) if proc.poll() is None else []
            for pid in pids:
                self._seen.setdefault(pid, _start_time(pid))
                self._signal(pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                for pid in tree(proc.pid):
                    self._seen.setdefault(pid, _start_time(pid))
                    self._signal(pid, signal.SIGKILL)
                proc.wait(timeout=10)
        deadline = time.monotonic() + grace
        leftover = [pid for pid in self._seen if _alive(pid) and _start_time(pid) == self._seen[pid]]
        for pid in leftover:  # grandchildren a dead child left behind
            self._signal(pid, signal.SIGTERM)
        for pid in leftover:
            while time.monotonic() < deadline and _alive(pid) and _start_time(pid) == self._seen[pid]:
                time.sleep(0.2)
            self._signal(pid, signal.SIGKILL)
        for thread in self._threads.values():
            thread.join(timeout=2)

    def _signal(self, pid: int, sig: int) -> None:
        """Signal ``pid`` only if it is still the process we saw (not a reused PID)."""
        if pid == os.getpid() or not _alive(pid) or _start_time(pid) != self._seen.get(pid):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
