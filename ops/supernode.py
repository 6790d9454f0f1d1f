"""A site's connection to the federation: a Flower SuperNode with the site's own settings.

``fedlens client start`` checks the site's side first (CA, key, data folder, state
folder) and then the server's TLS certificate against the site's CA, so the common
set-up mistakes get a message that says what is wrong and who fixes it, instead of a
SuperNode retrying forever. The site's data path, privacy budget and device go into
the SuperNode's node config: the server's run config cannot change them.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedlens.shared.config import DEFAULT_DELTA, DEFAULT_MAX_IMAGE_PIXELS
from fedlens.shared.errors import FedlensError

from .executor import AppApprovals, SiteExecutor
from .procs import die_with_parent, flower_env

__all__ = ["DEFAULT_APP_PORT", "SiteSettings", "ConnectError", "check_server", "node_config", "supernode_command", "run_supernode"]

_log = logging.getLogger("fedlens.client")

# Local port of the SuperNode's Runtime HTTP API (`flower-supernode --port`; Flower's
# default, 9094). Only two sites on one host need different ones.
DEFAULT_APP_PORT = 9094


class ConnectError(FedlensError):
    """The site cannot (or must not) connect to the server as configured."""


@dataclass(frozen=True)
class SiteSettings:
    """Everything a site decides for itself."""

    server: str
    data: Path
    state_dir: Path
    name: str
    ca: Path | None = None  # None = plaintext (insecure)
    key: Path | None = None
    max_epsilon: float = 8.0
    delta: float = DEFAULT_DELTA
    allow_evaluation: bool = False
    allow_non_private: bool = False
    device: str = "auto"
    port: int = DEFAULT_APP_PORT
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    class_map: Path | None = None  # the site's names for the federation's classes


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConnectError(f"--server {address!r} must be HOST:PORT, e.g. fl.example.org:9092")
    return host.strip("[]"), int(port)


def check_server(address: str, ca: Path | None, *, timeout: float = 10.0) -> str:
    """Check that the server at ``address`` is reachable and that TLS works as configured.

    Returns a short description on success.

    Raises
    ------
    ConnectError
        With the reason (expired, wrong CA, name not in the certificate, server
        without TLS, client without TLS) and how to fix it. An unreachable server is
        not an error here (the SuperNode keeps retrying); it is logged.
    """
    host, port = _split(address)
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        _log.warning("server %s not reachable yet (%s); the site will keep trying to connect", address, exc.strerror or exc)
        return f"TLS not checked: {address} is not reachable yet"
    with raw:
        if ca is None:
            return _check_plaintext(raw, address)
        try:
            ctx = ssl.create_default_context(cafile=str(ca))
        except (ssl.SSLError, OSError) as exc:
            raise ConnectError(f"--ca {ca} is not a PEM CA certificate ({exc}); pass the federation's ca.pem") from exc
        try:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                return f"TLS {tls.version()} to {address}, certificate verified against {ca}"
        except ssl.SSLCertVerificationError as exc:
            raise ConnectError(_verify_message(exc, address, ca)) from exc
        except (ssl.SSLError, ConnectionResetError) as exc:
            raise ConnectError(
                f"TLS handshake with {address} failed ({getattr(exc, 'reason', None) or exc}): the server does not speak TLS. "
                "If it was started with --insecure, ask its admin to restart it with certificates "
                "(`fedlens server start --certs DIR`); never send site data over a plaintext link"
            ) from exc


def _verify_message(exc: ssl.SSLCertVerificationError, address: str, ca: Path) -> str:
    code = getattr(exc, "verify_code", None)
    detail = getattr(exc, "verify_message", str(exc))
    if code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        return f"the server certificate of {address} has expired; ask the server admin to re-issue it (`fedlens certs init --force`) and send you the new ca.pem"
    if code == 9:  # X509_V_ERR_CERT_NOT_YET_VALID
        return f"the server certificate of {address} is not valid yet; check the clocks of both machines"
    if code == 62 or "hostname" in detail.lower() or "ip address mismatch" in detail.lower():
        return (
            f"the server certificate does not cover the name you dial ({_split(address)[0]}): {detail}. "
            "Dial one of the names in the certificate, or ask the server admin to re-issue it with that name in --server-name"
        )
    if code in (18, 19, 20, 21, 2):  # self-signed / unknown issuer
        return (
            f"the server at {address} presented a certificate not signed by your CA {ca} ({detail}). "
            "Use the ca.pem the server admin gave you for this federation; if it is the right one, you may be talking to the wrong server"
        )
    return f"the server certificate of {address} failed verification against {ca}: {detail}"


def _check_plaintext(sock: socket.socket, address: str) -> str:
    """With --insecure: refuse to go on when the server actually wants TLS."""
    try:
        sock.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        head = sock.recv(16)
    except OSError:
        head = b""
    if not head.startswith(b"HTTP/"):
        raise ConnectError(
            f"the server at {address} requires TLS but this site was started with --insecure; "
            "drop --insecure and pass --ca ca.pem and --key SITE.key (from the server admin)"
        )
    return f"plaintext HTTP to {address} (INSECURE)"


def node_config(s: SiteSettings) -> str:
    """The SuperNode's ``--node-config``: site-owned settings the server cannot override."""
    items = {
        "site-name": s.name,
        "data-path": str(s.data.resolve()),
        "state-dir": str(s.state_dir.resolve()),
        "max-epsilon": float(s.max_epsilon),
        "delta": float(s.delta),
        "allow-evaluation": s.allow_evaluation,
        "allow-non-private": s.allow_non_private,
        "device": s.device,
        "max-image-pixels": int(s.max_image_pixels),
        **({"class-map": str(s.class_map.resolve())} if s.class_map else {}),
    }

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float | int):
            return repr(v)
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    return " ".join(f"{k}={value(v)}" for k, v in items.items())


SECRET_FILE = ".superexec-secret"


def supernode_command(s: SiteSettings) -> list[str]:
    """The SuperNode, with no executor of its own: ``fedlens client start`` serves its tasks
    (:mod:`fedlens.ops.executor`), authenticated by the secret in ``STATE_DIR/.superexec-secret``.

    It is Flower's ``flower-supernode``, started through :mod:`fedlens.ops.flower_supernode`
    to shorten its fixed waits (between asks for a message: 0.5 s instead of 3 s)."""
    cmd = [sys.executable, "-m", "fedlens.ops.flower_supernode", "--superlink", s.server, "--node-config", node_config(s)]
    cmd += ["--host", "127.0.0.1", "--port", str(s.port), "--isolation", "process"]
    cmd += ["--superexec-auth-secret-file", str((s.state_dir / SECRET_FILE).resolve())]
    if s.ca is None:
        return [*cmd, "--insecure"]
    assert s.key is not None
    return [*cmd, "--root-certificates", str(s.ca.resolve()), "--auth-supernode-private-key", str(s.key.resolve())]


def check_site(s: SiteSettings) -> int:
    """Check the site's own side before connecting; returns the number of usable images."""
    if s.ca is not None:
        if not s.ca.is_file():
            raise ConnectError(f"CA certificate {s.ca} not found; the server admin gives every site the federation's ca.pem")
        if s.key is None or not s.key.is_file():
            raise ConnectError(
                f"site key {s.key} not found; create it with `fedlens certs add-site {s.name} --out DIR` and have the server register SITE.pub"
            )
        mode = s.key.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConnectError(f"site key {s.key} is readable by others (mode {mode:o}); run `chmod 600 {s.key}`")
        if b"OPENSSH PRIVATE KEY" not in s.key.read_bytes()[:64]:
            raise ConnectError(f"{s.key} is not an OpenSSH private key; pass the SITE.key file from `fedlens certs add-site`")
    if s.max_epsilon <= 0:
        raise ConnectError(f"--max-epsilon must be > 0, got {s.max_epsilon}")
    if not 0 < s.delta < 1:
        raise ConnectError(f"--delta must be in (0, 1), got {s.delta}")
    s.state_dir.mkdir(parents=True, exist_ok=True)
    if s.max_image_pixels < 1:
        raise ConnectError(f"--max-image-pixels must be at least 1, got {s.max_image_pixels}")
    return _check_data(s)


def _check_data(s: SiteSettings) -> int:
    """The site's data check: a summary in the log, the report in ``STATE_DIR/data-check.json``.

    It checks against the classes of the last global model this site kept, if any (a
    run's own come with its first message), and refuses to start only for what no
    label set fixes: no usable image, or two folders landing on one class without the
    class map saying so. Returns the number of usable images.
    """
    from fedlens.shared.checkpoint import GLOBAL_MODEL_FILE
    from fedlens.shared.data import LabelMismatch, check_data, load_class_map, scan_folder, write_data_check
    from fedlens.shared.errors import DataError

    from .data_cli import classes_from

    class_map = load_class_map(s.class_map) if s.class_map else None
    classes, source = None, None
    if (s.state_dir / GLOBAL_MODEL_FILE).is_file():
        try:
            classes, source = classes_from(s.state_dir / GLOBAL_MODEL_FILE)
        except FedlensError as exc:
            _log.warning("%s: the data check cannot read the classes of the kept global model: %s", s.name, exc)
    scan = scan_folder(s.data, max_pixels=s.max_image_pixels)
    # The run's batch-size arrives with its first message: no batch warning before then.
    check = check_data(scan, classes=classes, class_map=class_map, batch_size=None, eval_fraction=0.0, classes_from=source)
    path = write_data_check(check, s.state_dir)
    for line in check.summary():
        _log.log(logging.WARNING if line.startswith(("WOULD", "warning")) else logging.INFO, "%s: %s", s.name, line)
    _log.info("%s: the full data check is in %s; it stays at this site", s.name, path)
    if check.problems and classes is None:
        raise LabelMismatch(". Also: ".join(check.problems))
    if not check.images:
        reasons = ", ".join(f"{n} {r}" for r, n in check.to_dict()["skipped"]["by_reason"].items())
        raise DataError(f"data folder {s.data} has 0 usable images ({reasons or 'the class folders are empty'})")
    return check.images


INSECURE_BANNER = "INSECURE SITE: --insecure sends model updates in plaintext and skips site authentication; closed test networks only"

# Flower's own failure lines, translated for a site's IT admin.
_FLOWER_ERRORS = (
    (
        re.compile(r"Failed to activate SuperNode"),
        "the server did not accept this site's key: it is not registered (or was removed); "
        "send SITE.pub to the server admin, who runs `fedlens server add-site SITE SITE.pub`. (A site restarted right after a crash "
        "is refused the same way for about a minute, until the server notices it went away: then just start it again.)",
    ),
    (
        re.compile(r"CERTIFICATE_VERIFY_FAILED"),
        "the server's TLS certificate was not accepted (wrong CA, expired, or a name mismatch); check --ca and the address you dial",
    ),
    (re.compile(r"requires a secure TLS connection"), "site authentication needs TLS: pass --ca instead of --insecure"),
)


def _new_secret(path: Path) -> bytes:
    """A fresh random secret for this start, readable by this user only."""
    secret = secrets.token_hex(32).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secret)
    return secret


def run_supernode(s: SiteSettings, *, on_run: Callable[..., None] | None = None) -> int:
    """Run the SuperNode in the foreground, serving its tasks here; returns its exit code.

    The site executor (:class:`~fedlens.ops.executor.SiteExecutor`) runs in a thread of
    this process and answers with the installed ClientApp, for approved apps only.
    Known fatal Flower errors end the site with a translated message (exit 3).
    SIGINT/SIGTERM stop the SuperNode.

    Parameters
    ----------
    s : SiteSettings
        The site's own settings.
    on_run : callable, optional
        Told of every run the executor sees (for the site's audit log).
    """
    secret = _new_secret(s.state_dir / SECRET_FILE)
    cmd = supernode_command(s)
    env = flower_env()
    # Its own session (stopped as a group), and SIGTERMed by the kernel if this process dies
    # without stopping it (SIGKILL, the OOM killer): a SuperNode without its executor would
    # take the server's tasks and never answer them.
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, preexec_fn=die_with_parent()
    )
    executor = SiteExecutor(f"127.0.0.1:{s.port}", secret, AppApprovals(s.state_dir), site=s.name, on_run=on_run)
    threading.Thread(target=executor.serve_forever, name="fedlens-site-executor", daemon=True).start()

    def stop(signum: int, _frame: object) -> None:
        executor.stop()
        _terminate(proc)
        # Not SystemExit: that would wait for a task's worker threads. Every file the site
        # writes is crash-safe (ledger: temp file, fsync, rename; audit log: fsynced lines).
        logging.shutdown()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    assert proc.stdout is not None
    recent: collections.deque[str] = collections.deque(maxlen=60)
    since_exit: int | None = None  # lines read since Flower's "Exit Code: 30x"
    try:
        for line in proc.stdout:
            sys.stderr.write(line)
            recent.append(line)
            if since_exit is None and _EXIT.search(line):
                since_exit = 0
            elif since_exit is not None:
                since_exit += 1
            if since_exit is not None and since_exit >= 6:  # the reason follows the code line
                message = _reason(recent)
                if message:
                    _log.error("%s: %s", s.name, message)
                    executor.stop()
                    _terminate(proc)
                    return 3
                since_exit = None
    except KeyboardInterrupt:
        executor.stop()
        _terminate(proc)
        return 130
    code = proc.wait()
    executor.stop()
    message = _reason(recent) if code != 0 and any(_EXIT.search(line) for line in recent) else None
    if message:
        _log.error("%s: %s", s.name, message)
        return 3
    return code


# Flower's SuperNode prints "Exit Code: 3xx" when it cannot connect; only the lines around
# it (not the training app's own output) are read for the reason.
_EXIT = re.compile(r"Exit Code: 30\d")


def _reason(recent: collections.deque[str]) -> str | None:
    text = "".join(recent)
    for pattern, message in _FLOWER_ERRORS:
        if pattern.search(text):
            return message
    return None


def _terminate(proc: subprocess.Popen[str]) -> None:
    """Stop the SuperNode's whole process group (it, its SuperExec and app processes)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
