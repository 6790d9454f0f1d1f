"""Talk to a SuperLink's Control API through Flower's own ``flwr`` CLI.

Every call gets a private ``FLWR_HOME`` holding exactly one connection (address,
CA, or plaintext), so nothing depends on or changes the user's Flower config, and
no call can fall back to Flower's built-in ``local`` simulation SuperLink.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlens.shared.errors import FedlensError

from .frontdoor import REFUSAL
from .procs import flower_bin, flower_env

__all__ = ["Connection", "ControlError"]

_log = logging.getLogger("fedlens.server.control")

CONNECTION = "fedlens"


class ControlError(FedlensError):
    """The SuperLink could not be reached or refused a request."""


@dataclass(frozen=True)
class Connection:
    """How to reach one SuperLink: ``host:port`` plus the CA that signed its certificate."""

    address: str
    ca: Path | None  # None = plaintext (--insecure)

    def __post_init__(self) -> None:
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ControlError(f"server address {self.address!r} must be HOST:PORT, e.g. fl.example.org:9092")
        if self.ca is not None and not Path(self.ca).is_file():
            raise ControlError(f"CA certificate {self.ca} not found; pass the federation's ca.pem (from `fedlens certs init`)")

    def _home(self) -> str:
        home = tempfile.mkdtemp(prefix="fedlens-flwr-")
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{self.address}"']
        if self.ca is None:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{Path(self.ca).resolve()}"')
        Path(home, "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return home

    def flwr(self, *args: str, timeout: float | None = 120) -> dict[str, Any]:
        """Run ``flwr ARGS... fedlens --format json`` and return its JSON reply.

        Raises
        ------
        ControlError
            When the command fails or the reply says ``success: false``.
        """
        home = self._home()
        try:
            proc = subprocess.run(
                [flower_bin("flwr"), *args, CONNECTION, "--format", "json"],
                env=flower_env(FLWR_HOME=home),
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise ControlError(f"the server at {self.address} did not answer `flwr {args[0]}` within {timeout:.0f}s") from exc
        finally:
            _rmtree(home)
        reply = _json_tail(proc.stdout)
        if proc.returncode != 0 or not reply.get("success", False):
            if REFUSAL in proc.stdout + proc.stderr + str(reply.get("error-message", "")):
                raise ControlError(_front_door_message(self.address, args[0]))
            detail = reply.get("error-message") or " / ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise ControlError(f"`flwr {' '.join(args)}` against {self.address} failed: {detail}")
        return reply

    # ---- sites ---------------------------------------------------------------
    def register(self, public_key: Path, site: str) -> str:
        """Register a site's public key; returns the node id the SuperLink assigned."""
        reply = self.flwr("supernode", "register", str(public_key), "--name", site)
        return str(reply.get("node-id", ""))

    def unregister(self, node_id: str) -> None:
        self.flwr("supernode", "unregister", node_id)

    def nodes(self) -> list[dict[str, Any]]:
        return list(self.flwr("supernode", "list").get("nodes", []))

    # ---- runs ----------------------------------------------------------------
    def submit(self, app: Path, run_config: Path) -> str:
        """Submit the app in ``app`` with ``run_config`` overrides; returns Flower's run id."""
        reply = self.flwr("run", str(app), "--run-config", str(run_config), timeout=600)
        return str(reply["run-id"])

    def run_status(self, run_id: str) -> str:
        """Flower's status of a run, e.g. ``running`` or ``finished:completed``."""
        runs = self.flwr("ls", "--run-id", run_id).get("runs", [])
        if not runs:
            raise ControlError(f"the server does not know run {run_id}")
        return str(runs[0].get("status", "unknown"))

    def stream_logs(self, run_id: str) -> Iterator[str]:
        """Yield the run's log lines as the ServerApp writes them, until the run ends."""
        home = self._home()
        try:
            proc = subprocess.Popen(
                [flower_bin("flwr"), "log", run_id, CONNECTION, "--stream"],
                env=flower_env(FLWR_HOME=home),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            assert proc.stdout is not None
            try:
                yield from proc.stdout
            finally:
                if proc.poll() is None:
                    proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            _rmtree(home)


def _front_door_message(address: str, command: str) -> str:
    return (
        f"{address} refused `flwr {command}` ({REFUSAL}): that is the port the sites dial, which serves the site API only. "
        "Operator commands reach the server's SuperLink on the server host's loopback port: run "
        "`fedlens run --state-dir STATE_DIR ...` there (or --server with the 'address' in STATE_DIR/server.json, "
        "127.0.0.1:9093 by default)"
    )


def _json_tail(text: str) -> dict[str, Any]:
    """The JSON object printed by ``flwr --format json`` (after any log lines)."""
    start = text.find("{")
    while start != -1:
        try:
            return dict(json.loads(text[start:]))
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return {}


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
