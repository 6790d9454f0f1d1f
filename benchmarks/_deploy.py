"""A real deployment on loopback for the deployment benchmarks: the server and its sites as processes."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from fedlens.ops.procs import Procs, free_port, listening, wait_for


def stop_children_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the benchmark's ``finally`` stops the processes it started
    (they run in sessions of their own and would otherwise outlive it)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def start_server(procs: Procs, certs: Path, state: Path) -> tuple[subprocess.Popen[bytes], int]:
    """`fedlens server start` (TLS, site authentication, front door) on free loopback ports; the process and the sites' port."""
    port, internal = free_port(), free_port()
    server = procs.start(
        "server",
        *("server", "start", "--certs", str(certs), "--state-dir", str(state)),
        *("--host", "127.0.0.1", "--port", str(port), "--internal-port", str(internal)),
    )
    wait_for(lambda: listening(port), 120, "server")
    return server, port


def start_site(
    procs: Procs, env: dict[str, str], *, name: str, certs: Path, state: Path, port: int, data: Path, site_state: Path
) -> subprocess.Popen[bytes]:
    """Register ``name`` at the server (`server add-site`) and start its `fedlens client start` (max-epsilon 1000, evaluation allowed)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "fedlens.ops.cli",
            "server",
            "add-site",
            name,
            str(certs / "sites" / f"{name}.pub"),
            "--state-dir",
            str(state),
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    return procs.start(
        name,
        *("client", "start", "--server", f"127.0.0.1:{port}", "--ca", str(certs / "ca.pem")),
        *("--key", str(certs / "sites" / f"{name}.key"), "--data", str(data), "--state-dir", str(site_state)),
        *("--max-epsilon", "1000", "--allow-evaluation", "--port", str(free_port())),
    )
