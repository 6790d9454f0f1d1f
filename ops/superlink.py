"""The federation server: a Flower SuperLink behind a front door, with TLS, site authentication and persistent state.

``fedlens server start`` checks everything it can before starting (certificates
present, readable, valid now and matching their key; the state folder writable;
both ports free) and then runs two processes and supervises them:

- the SuperLink (``flower-superlink``) on ``127.0.0.1:INTERNAL_PORT`` only. Flower
  serves run submission, node registration and the ServerApp's runtime calls on
  that one port, without authentication, so only the server host reaches it: that
  is where operator commands (``fedlens run``, ``fedlens server add-site``...) go.
- the front door (:mod:`fedlens.ops.frontdoor`) on the public ``--host:--port``
  the sites dial, with the server's certificate. It forwards the site (Fleet) API
  calls and nothing else.

How to reach the SuperLink is recorded in ``STATE_DIR/server.json``. SIGTERM or
SIGINT stops both processes (their whole process trees, by PID); when either one
ends on its own, the other is stopped too and the command exits non-zero saying
which one ended and with what.

The registry of sites (``STATE_DIR/sites.json``) maps site names to the node ids
the SuperLink assigned to their keys, so a site is removed by name, and the
ServerApp names sites by it (its path reaches the ServerApp process in the
environment, :data:`fedlens.shared.protocol.SITE_REGISTRY_ENV`).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlens.shared.io import atomic_write_json
from fedlens.shared.protocol import SITE_REGISTRY_ENV

from .certs import CertError, CertPaths, check_site_name
from .control import Connection, ControlError
from .procs import ChildExited, Supervisor, flower_bin, flower_env

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_INTERNAL_PORT",
    "ServerFailed",
    "ServerSettings",
    "superlink_command",
    "frontdoor_command",
    "start_server",
    "add_site",
    "remove_site",
    "list_sites",
    "server_connection",
]

_log = logging.getLogger("fedlens.server")

SERVER_FILE = "server.json"
SITES_FILE = "sites.json"
DATABASE = "superlink.db"
# The port sites dial (Flower's own Fleet API default, 9092): the front door.
DEFAULT_PORT = 9092
# The SuperLink's port on 127.0.0.1, for operator commands on the server host
# (Flower's former Control API default, 9093).
DEFAULT_INTERNAL_PORT = 9093
SUPERLINK = "the SuperLink"
FRONT_DOOR = "the front door"


@dataclass(frozen=True)
class ServerSettings:
    """What ``fedlens server start`` was asked for."""

    state_dir: Path
    certs: Path | None  # None only with insecure
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    insecure: bool = False
    internal_port: int = DEFAULT_INTERNAL_PORT


class ServerFailed(ControlError):
    """One of the server's processes ended on its own; the others were stopped."""


def check_certificates(certs: Path) -> list[str]:
    """Validate a certificate folder for serving; returns the server certificate's SANs.

    Raises
    ------
    CertError
        Missing files, a certificate not valid now, a key that does not match, or a
        server certificate not signed by the folder's CA, each with the fix.
    """
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    paths = CertPaths(certs)
    for f in (paths.ca_cert, paths.server_cert, paths.server_key):
        if not f.is_file():
            raise CertError(
                f"{f} not found; create the federation's certificates with `fedlens certs init --out {certs} --server-name NAME`"
            )
    try:
        ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
        key = serialization.load_pem_private_key(paths.server_key.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CertError(f"cannot read the certificates in {certs}: {exc}") from exc
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertError(
            f"{paths.server_cert} is valid from {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}, not now; "
            f"re-issue it with `fedlens certs init --out {certs} --server-name ... --force` and send sites the new ca.pem"
        )
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.PEM, pub) != cert.public_key().public_bytes(serialization.Encoding.PEM, pub):
        raise CertError(f"{paths.server_key} is not the key of {paths.server_cert}; re-issue both with `fedlens certs init --force`")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CertError(
            f"{paths.server_cert} was not issued by {paths.ca_cert}; keep the CA and server certificate from one `fedlens certs init`"
        ) from exc
    if not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
        raise CertError(
            f"the CA certificate {paths.ca_cert} is not valid now (until {ca.not_valid_after_utc:%Y-%m-%d}); create a new federation CA with `fedlens certs init --force`"
        )
    if (now + dt.timedelta(days=30)) > cert.not_valid_after_utc:
        _log.warning("the server certificate expires on %s; re-issue it soon", f"{cert.not_valid_after_utc:%Y-%m-%d}")
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in (*sans.get_values_for_type(x509.DNSName), *sans.get_values_for_type(x509.IPAddress))]


def superlink_command(s: ServerSettings) -> list[str]:
    """The ``flower-superlink`` command line for ``s``: on ``127.0.0.1:internal_port``, TLS and site
    authentication unless insecure."""
    cmd = [
        flower_bin("flower-superlink"),
        "--host",
        "127.0.0.1",
        "--port",
        str(s.internal_port),
        "--database",
        str(s.state_dir / DATABASE),
        "--disable-runtime-dependency-installation",
    ]
    if s.insecure:
        return [*cmd, "--insecure"]
    assert s.certs is not None
    paths = CertPaths(s.certs)
    return [
        *cmd,
        "--ssl-ca-certfile",
        str(paths.ca_cert.resolve()),
        "--ssl-certfile",
        str(paths.server_cert.resolve()),
        "--ssl-keyfile",
        str(paths.server_key.resolve()),
        "--enable-supernode-auth",
    ]


def frontdoor_command(s: ServerSettings) -> list[str]:
    """The front door's command line for ``s``: the public ``host:port``, forwarding to the SuperLink."""
    cmd = [sys.executable, "-m", "fedlens.ops.frontdoor", "--host", s.host, "--port", str(s.port), "--upstream-port", str(s.internal_port)]
    if s.insecure:
        return [*cmd, "--insecure"]
    assert s.certs is not None
    paths = CertPaths(s.certs)
    return [
        *cmd,
        "--cert",
        str(paths.server_cert.resolve()),
        "--key",
        str(paths.server_key.resolve()),
        "--ca",
        str(paths.ca_cert.resolve()),
    ]


INSECURE_BANNER = """
############################################################################
#  INSECURE SERVER: --insecure turns TLS and site authentication OFF.      #
#  Model updates travel in plaintext and ANY machine that can reach this  #
#  port can join as a site. Use only on a closed test network; for real    #
#  sites run `fedlens certs init` and drop --insecure.                     #
############################################################################
"""

# How long the SuperLink and the front door may take to listen (a cold start imports a lot).
_READY_TIMEOUT_S = 120.0


def start_server(s: ServerSettings) -> int:
    """Check, record and run the server until SIGTERM/SIGINT; returns 0 then.

    Raises
    ------
    CertError
        Certificates missing, invalid or not matching.
    ControlError
        State folder not writable, or a port taken.
    ServerFailed
        The SuperLink or the front door ended on its own (the other one was stopped):
        which one, its exit code and its last output lines.
    """
    if s.insecure:
        _log.warning(INSECURE_BANNER)
    else:
        if s.certs is None:
            raise CertError(
                "give the certificate folder with --certs DIR (from `fedlens certs init`), or --insecure for a closed test network"
            )
        sans = check_certificates(s.certs)
        _log.info("TLS on; sites may dial %s (the certificate's names) on port %d", ", ".join(sans) or "?", s.port)
    s.state_dir.mkdir(parents=True, exist_ok=True)
    probe = s.state_dir / ".write-test"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ControlError(f"state folder {s.state_dir} is not writable: {exc}") from exc
    if s.internal_port == s.port:
        raise ControlError(f"--internal-port {s.internal_port} is the public --port; give the SuperLink another loopback port")
    _check_port_free(s.host, s.port)
    _check_port_free("127.0.0.1", s.internal_port, option="--internal-port")
    info: dict[str, Any] = {
        # What operator commands dial: the SuperLink itself, on this host's loopback.
        "address": f"127.0.0.1:{s.internal_port}",
        "internal_port": s.internal_port,
        # What sites dial: the front door.
        "public_address": f"{s.host}:{s.port}",
        "ca": str(CertPaths(s.certs).ca_cert.resolve()) if s.certs and not s.insecure else None,
        "insecure": s.insecure,
        "site_auth": not s.insecure,
        "pid": os.getpid(),
    }
    atomic_write_json(s.state_dir / SERVER_FILE, info)
    # Without site authentication node ids are not bound to keys: no registry to name sites by.
    registry = {} if s.insecure else {SITE_REGISTRY_ENV: str((s.state_dir / SITES_FILE).resolve())}
    sup = Supervisor(flower_env(**registry))
    previous = {sig: signal.signal(sig, lambda *_: sup.stopping.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _supervise(s, sup, info)
    finally:
        sup.stop_all(order=[FRONT_DOOR, SUPERLINK])
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _log.info("server stopped")


def _supervise(s: ServerSettings, sup: Supervisor, info: dict[str, Any]) -> int:
    """Start the SuperLink, then the front door; watch both until a stop signal or one of them ends."""
    try:
        cmd = superlink_command(s)
        _log.info("starting the SuperLink on 127.0.0.1:%d: %s", s.internal_port, " ".join(cmd))
        sup.start(SUPERLINK, cmd)
        sup.wait_ready(
            SUPERLINK, lambda: _listening("127.0.0.1", s.internal_port), _READY_TIMEOUT_S, f"listening on port {s.internal_port}"
        )
        if sup.stopping.is_set():
            return 0
        sup.start(FRONT_DOOR, frontdoor_command(s))
        sup.wait_ready(FRONT_DOOR, lambda: _listening(s.host, s.port), _READY_TIMEOUT_S, f"listening on {s.host}:{s.port}")
    except ChildExited as exc:
        raise ServerFailed(f"the server did not start: {exc}") from exc
    except TimeoutError as exc:
        raise ServerFailed(str(exc)) from exc
    if sup.stopping.is_set():
        return 0
    atomic_write_json(
        s.state_dir / SERVER_FILE, {**info, "superlink_pid": sup.children[SUPERLINK].pid, "frontdoor_pid": sup.children[FRONT_DOOR].pid}
    )
    _log.info(
        "server ready: sites dial port %d (front door: site API only); operator commands on this host use 127.0.0.1:%d "
        "(`fedlens run --state-dir %s`)",
        s.port,
        s.internal_port,
        s.state_dir,
    )
    ended = sup.watch()
    if ended is None:
        _log.info("stop requested; stopping the front door and the SuperLink")
        return 0
    raise ServerFailed(f"{sup.report(*ended)}\nstopped the server's other processes")


def _listening(host: str, port: int) -> bool:
    """Whether ``host:port`` accepts TCP connections (a wildcard host is checked on loopback)."""
    dial = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    try:
        with socket.create_connection((dial, port), timeout=1):
            return True
    except OSError:
        return False


def _check_port_free(host: str, port: int, option: str = "--port") -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ControlError(
                f"cannot listen on {host}:{port}: {exc.strerror}; is a server already running? choose another {option}"
            ) from exc


def server_connection(state_dir: Path) -> Connection:
    """How to reach the server started with ``state_dir`` (from its ``server.json``)."""
    path = state_dir / SERVER_FILE
    if not path.is_file():
        raise ControlError(f"{path} not found; is {state_dir} the --state-dir of a `fedlens server start`?")
    info = json.loads(path.read_text(encoding="utf-8"))
    return Connection(info["address"], None if info["insecure"] else Path(info["ca"]))


class _Registry:
    """``sites.json`` under a lock: site name -> node id and key fingerprint."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / SITES_FILE
        self._lock = state_dir / ".sites.lock"

    def __enter__(self) -> dict[str, Any]:
        self._fh = open(self._lock, "a")
        fcntl.flock(self._fh, fcntl.LOCK_EX)
        self.data: dict[str, Any] = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        self._before = json.dumps(self.data, sort_keys=True)
        return self.data

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None and json.dumps(self.data, sort_keys=True) != self._before:
            atomic_write_json(self.path, self.data)
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()


def add_site(state_dir: Path, site: str, public_key: Path) -> str:
    """Register ``site``'s public key with the running server; returns its node id."""
    check_site_name(site)
    if not public_key.is_file():
        raise ControlError(f"public key {public_key} not found; the site's admin sends SITE.pub from `fedlens certs add-site`")
    text = public_key.read_text(encoding="utf-8", errors="replace").strip()
    if not text.startswith("ecdsa-sha2-nistp"):
        raise ControlError(
            f"{public_key} is not an OpenSSH EC public key (expected 'ecdsa-sha2-nistp384 ...'); send the .pub file, never the private key"
        )
    fingerprint = hashlib.sha256(text.split()[1].encode()).hexdigest()[:16]
    conn = server_connection(state_dir)
    with _Registry(state_dir) as sites:
        if site in sites:
            raise ControlError(
                f"site {site!r} is already registered (node {sites[site]['node_id']}); remove it first with `fedlens server remove-site {site}`"
            )
        node_id = conn.register(public_key, site)
        sites[site] = {
            "node_id": node_id,
            "key_sha256": fingerprint,
            "added": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
    return node_id


def remove_site(state_dir: Path, site: str) -> str:
    """Revoke ``site``: the SuperLink forgets its key, so it can no longer connect."""
    conn = server_connection(state_dir)
    with _Registry(state_dir) as sites:
        if site not in sites:
            raise ControlError(f"no site {site!r} in {state_dir / SITES_FILE}; registered: {', '.join(sorted(sites)) or 'none'}")
        node_id = sites[site]["node_id"]
        conn.unregister(node_id)
        del sites[site]
    return str(node_id)


def list_sites(state_dir: Path) -> dict[str, dict[str, Any]]:
    """Registered sites with their live status from the server (``online``, ``offline``...)."""
    conn = server_connection(state_dir)
    status = {str(n.get("node-id")): n.get("status", "?") for n in conn.nodes()}
    with _Registry(state_dir) as sites:
        return {name: {**info, "status": status.get(str(info["node_id"]), "unknown")} for name, info in sorted(sites.items())}
