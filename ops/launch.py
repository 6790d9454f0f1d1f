"""``fedlens run``: submit a training run to a running server and see it through.

The ServerApp writes the run folder (``run-dir``) on the server host, so run this
where that folder lives (normally the server host). When the server goes away
mid-run (crash, restart), Flower marks the run failed; ``fedlens run`` waits for the
server to come back and submits the run again with the same folder, and the
ServerApp resumes it from the last completed round (``--max-restarts``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedlens.shared.config import RUN_DIR_KEY, FedConfig
from fedlens.shared.errors import FedlensError
from fedlens.shared.rundir import RunDir

from .control import Connection, ControlError
from .fab import write_app

__all__ = ["RunFailed", "launch"]

_log = logging.getLogger("fedlens.server.run")

# Flower's per-round chatter is replaced by fedlens' own progress line.
_QUIET = re.compile(r"(configure_|aggregate_|└──>|├──|│|Received \d+ results|Sampled \d+ nodes|^\s*$)")


class RunFailed(FedlensError):
    """The run ended without finishing all its rounds."""


def _run_config_file(cfg: FedConfig, run_dir: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix="fedlens-run-", suffix=".toml")
    with open(fd, "w", encoding="utf-8") as fh:
        fh.write(cfg.to_toml() + f"{RUN_DIR_KEY} = {json.dumps(str(run_dir))}\n")
    return Path(name)


def launch(
    conn: Connection,
    cfg: FedConfig,
    run_dir: Path,
    *,
    max_restarts: int = 3,
    reconnect_timeout: float = 300.0,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run ``cfg`` on the federation behind ``conn``, writing ``run_dir``; returns the summary.

    Raises
    ------
    RunFailed
        When the ServerApp failed, or the server did not come back in time.
    """
    run_dir = run_dir.resolve()
    app = write_app(Path(tempfile.mkdtemp(prefix="fedlens-app-")))
    config_file = _run_config_file(cfg, run_dir)
    try:
        for attempt in range(max_restarts + 1):
            flower_run = conn.submit(app, config_file)
            echo(f"submitted Flower run {flower_run}{' (resuming)' if attempt else ''}; run folder {run_dir}")
            status = _follow(conn, flower_run, echo, reconnect_timeout)
            run = RunDir(run_dir)
            local = run.status()
            if status == "finished:completed" and local.get("status") == "finished":
                return run.read_json("summary.json")
            if local.get("status") == "failed":
                raise RunFailed(f"the run failed: {local.get('error', 'see the server log')} (Flower status {status})")
            if local.get("status") != "running":  # the ServerApp failed before the run started
                raise RunFailed(f"the run failed to start (Flower status {status}); the server log above says why")
            if status != "finished:failed":  # e.g. stopped by an admin (`flwr stop`): respect it
                raise RunFailed(
                    f"the run ended as {status!r} after round {run.completed_rounds()}; continue it with `fedlens run --resume {run_dir}`"
                )
            if attempt < max_restarts:
                echo(f"Flower run {flower_run} ended as {status!r} after round {run.completed_rounds()}; resuming the run")
        raise RunFailed(f"the run did not finish after {max_restarts} restart(s); continue it with `fedlens run --resume {run_dir}`")
    finally:
        config_file.unlink(missing_ok=True)
        shutil.rmtree(app, ignore_errors=True)


def _follow(conn: Connection, flower_run: str, echo: Callable[[str], None], reconnect_timeout: float) -> str:
    """Stream the run's log until it ends; returns Flower's final status."""
    shown = 0  # `flwr log --stream` replays the whole log on every reconnect
    while True:
        final_dump = False  # Flower's end-of-run metric dump repeats what metrics.jsonl holds
        for n, line in enumerate(conn.stream_logs(flower_run)):
            line = line.rstrip()
            final_dump = final_dump or "Final results:" in line
            if n >= shown:
                shown = n + 1
                if not final_dump and not _QUIET.search(line):
                    echo(line)
        status = _status_when_reachable(conn, flower_run, reconnect_timeout)
        if status.startswith("finished"):
            return status
        time.sleep(2)  # the stream dropped while the run goes on: follow it again


def _status_when_reachable(conn: Connection, flower_run: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    warned = False
    while True:
        try:
            return conn.run_status(flower_run)
        except ControlError as exc:
            if time.monotonic() > deadline:
                raise RunFailed(
                    f"lost the server at {conn.address} for more than {timeout:.0f}s ({exc}); once it is back, continue with `fedlens run --resume DIR`"
                ) from exc
            if not warned:
                _log.warning("lost the server at %s; waiting up to %.0fs for it to come back", conn.address, timeout)
                warned = True
            time.sleep(3)
