"""The federation server: a Flower SuperLink with TLS, site authentication and persistent state.

``fedlens server start`` checks everything it can before starting (certificates
present, readable, valid now and matching their key; the state folder writable),
records how to reach the server in ``STATE_DIR/server.json`` and then *becomes*
``flower-superlink`` (``exec``), so a service manager or a test stops it by PID.
Flower's SuperExec, which the SuperLink starts, exits on its own when its parent
is gone.

The registry of sites (``STATE_DIR/sites.json``) maps site names to the node ids
the SuperLink assigned to their keys, so a site is removed by name.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlens.shared.io import atomic_write_json

from .certs import CertError, CertPaths, check_site_name
from .control import Connection, ControlError
from .procs import flower_bin, flower_env

__all__ = [
    "DEFAULT_PORT",
    "ServerSettings",
    "superlink_command",
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
# The port sites and `fedlens run` dial (Flower's own Fleet API default, 9092).
DEFAULT_PORT = 9092


@dataclass(frozen=True)
class ServerSettings:
    """What ``fedlens server start`` was asked for."""

    state_dir: Path
    certs: Path | None  # None only with insecure
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    insecure: bool = False


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
    """The ``flower-superlink`` command line for ``s`` (TLS and site authentication unless insecure)."""
    cmd = [
        flower_bin("flower-superlink"),
        "--host",
        s.host,
        "--port",
        str(s.port),
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


INSECURE_BANNER = """
############################################################################
#  INSECURE SERVER: --insecure turns TLS and site authentication OFF.      #
#  Model updates travel in plaintext and ANY machine that can reach this  #
#  port can join as a site or submit runs. Use only on a closed test       #
#  network; for real sites run `fedlens certs init` and drop --insecure.   #
############################################################################
"""


def start_server(s: ServerSettings) -> None:
    """Check, record and ``exec`` the SuperLink (does not return on success)."""
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
    _check_port_free(s.host, s.port)
    dial = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
    atomic_write_json(
        s.state_dir / SERVER_FILE,
        {
            "address": f"{dial}:{s.port}",
            "ca": str(CertPaths(s.certs).ca_cert.resolve()) if s.certs and not s.insecure else None,
            "insecure": s.insecure,
            "site_auth": not s.insecure,
        },
    )
    cmd = superlink_command(s)
    _log.info("starting the SuperLink: %s", " ".join(cmd))
    os.execve(cmd[0], cmd, flower_env())


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ControlError(
                f"cannot listen on {host}:{port}: {exc.strerror}; is a server already running? choose another --port"
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
