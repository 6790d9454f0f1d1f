"""The front door forwards exactly the site (Fleet) API, intact, and refuses everything else.

A real front door process (the command ``fedlens server start`` runs) with real TLS on
loopback, in front of a stand-in SuperLink that records every request reaching it.
Requests that must be refused are sent as raw bytes over TLS, so no client library
normalises a path before the front door sees it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import flwr
import httpx
import pytest
import uvicorn

from fedlens.ops.certs import CertPaths, init_ca
from fedlens.ops.frontdoor import FLEET_PATHS, REFUSAL, SELF_REGISTRATION_PATHS, allowed_paths
from fedlens.ops.procs import flower_env, free_port, listening, wait_for
from fedlens.ops.superlink import ServerSettings, frontdoor_command

FLOWER = Path(flwr.__file__).parent


# ---- the stand-in SuperLink ------------------------------------------------------
@dataclass
class Upstream:
    """An ASGI app that records what reaches it and answers as told by ``x-test-*`` headers."""

    seen: list[dict[str, object]] = field(default_factory=list)

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.seen.append({"method": scope["method"], "raw_path": scope["raw_path"], "headers": headers, "body": body})
        status = int(headers.get("x-test-status", "200"))
        chunks = int(headers.get("x-test-stream", "0"))
        out = [(b"x-upstream", b"yes"), (b"content-type", b"application/protobuf")]
        if chunks:  # no content-length: streamed, chunk by chunk
            await send({"type": "http.response.start", "status": status, "headers": out})
            for i in range(chunks):
                await send({"type": "http.response.body", "body": bytes([i % 256]) * 65536, "more_body": True})
                await asyncio.sleep(0)
            await send({"type": "http.response.body", "body": b""})
            return
        reply = json.dumps({"sha256": hashlib.sha256(body).hexdigest(), "length": len(body)}).encode()
        await send({"type": "http.response.start", "status": status, "headers": [*out, (b"content-length", str(len(reply)).encode())]})
        await send({"type": "http.response.body", "body": reply})


@dataclass
class Served:
    upstream: Upstream
    server: uvicorn.Server
    thread: threading.Thread
    port: int


def _serve_upstream(certs: CertPaths | None) -> Served:
    port = free_port()
    app = Upstream()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        ws="none",
        ssl_certfile=str(certs.server_cert) if certs else None,
        ssl_keyfile=str(certs.server_key) if certs else None,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "the stand-in SuperLink")
    return Served(app, server, thread, port)


@dataclass
class Door:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    upstream: Upstream
    ca: Path | None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _start_door(tmp: Path, name: str, upstream: Served, certs: Path | None) -> Door:
    port = free_port()
    settings = ServerSettings(state_dir=tmp, certs=certs, host="127.0.0.1", port=port, insecure=certs is None, internal_port=upstream.port)
    log = tmp / f"{name}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(frontdoor_command(settings), stdout=fh, stderr=subprocess.STDOUT, env=flower_env(), start_new_session=True)
    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, 60, f"the {name} front door")
    except TimeoutError:
        _stop(proc)
        raise
    assert proc.poll() is None, log.read_text()
    return Door(port, proc, log, upstream.upstream, CertPaths(certs).ca_cert if certs else None)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("frontdoor-certs")
    init_ca(folder, ["127.0.0.1"])
    return folder


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Door]:
    """A TLS front door in front of a TLS stand-in SuperLink with the same (federation CA-signed) certificate."""
    upstream = _serve_upstream(CertPaths(certs))
    d = _start_door(tmp_path_factory.mktemp("door"), "tls", upstream, certs)
    yield d
    _stop(d.proc)
    upstream.server.should_exit = True
    upstream.thread.join(timeout=10)


@pytest.fixture
def fresh(door: Door) -> Door:
    door.upstream.seen.clear()
    return door


def _client(door: Door) -> httpx.Client:
    return httpx.Client(base_url=f"https://127.0.0.1:{door.port}", verify=ssl.create_default_context(cafile=str(door.ca)), timeout=30)


def _raw(door: Door, request_line: bytes, *, headers: bytes = b"") -> int:
    """Send one request exactly as given (no client-side normalisation); its status code (403 only from the front door)."""
    ctx = ssl.create_default_context(cafile=str(door.ca)) if door.ca else None
    sock = socket.create_connection(("127.0.0.1", door.port), timeout=10)
    conn = ctx.wrap_socket(sock, server_hostname="127.0.0.1") if ctx else sock
    with conn:
        conn.sendall(request_line + b"\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n" + headers + b"\r\n")
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", data)
    assert match, data[:200]
    status = int(match.group(1))
    assert status != 403 or REFUSAL.encode() in data, data[:400]
    return status


# ---- the allow-list --------------------------------------------------------------
def test_the_allow_list_is_the_fleet_api_a_supernode_calls():
    """If Flower adds or renames a Fleet call, this says so before sites fail to connect."""
    client = (FLOWER / "supernode" / "fleet_http_client.py").read_text(encoding="utf-8")
    called = {p.encode() for p in re.findall(r'path="(/v1/fleet/[a-z-]+)"', client)}
    assert called == FLEET_PATHS | SELF_REGISTRATION_PATHS
    router = (FLOWER / "superlink" / "routers" / "fleet" / "router.py").read_text(encoding="utf-8")
    served = {f"/v1/fleet{p}".encode() for p in re.findall(r'@router\.post\("(/[a-z-]+)"\)', router)}
    assert served == called
    assert allowed_paths(self_registration=False) == FLEET_PATHS
    assert not any(b"register" in p for p in allowed_paths(self_registration=False))


# ---- forwarded, intact -----------------------------------------------------------
@pytest.mark.parametrize("path", sorted(p.decode() for p in FLEET_PATHS))
def test_every_site_api_call_is_forwarded(fresh: Door, path: str):
    with _client(fresh) as client:
        r = client.post(path, content=b"\x08\x01", headers={"content-type": "application/protobuf"})
    assert r.status_code == 200 and r.headers["x-upstream"] == "yes"
    (seen,) = fresh.upstream.seen
    assert seen["method"] == "POST" and seen["raw_path"] == path.encode() and seen["body"] == b"\x08\x01"


def test_headers_bodies_status_codes_and_streams_arrive_intact(fresh: Door):
    auth = {"flwr-public-key": "cHVi", "flwr-signature": "c2ln", "flwr-timestamp": "2026-01-01T00:00:00+00:00"}
    big = bytes(range(256)) * 20_000  # 5 MB, sent in pieces without a length (chunked)
    pieces = (big[i : i + 100_000] for i in range(0, len(big), 100_000))
    with _client(fresh) as client:
        r = client.post(
            "/v1/fleet/push-object",
            content=pieces,
            headers={**auth, "content-type": "application/protobuf", "x-test-status": "401", "x-forwarded-for": "10.9.9.9"},
        )
        assert r.status_code == 401 and r.headers["x-upstream"] == "yes"  # the SuperLink's answer, as it gave it
        assert r.json() == {"sha256": hashlib.sha256(big).hexdigest(), "length": len(big)}
        seen = fresh.upstream.seen[-1]["headers"]
        assert isinstance(seen, dict)
        assert {k: seen[k] for k in auth} == auth and seen["content-type"] == "application/protobuf"
        assert seen["x-forwarded-for"] == "127.0.0.1"  # the real peer, not what the caller claimed
        with client.stream("POST", "/v1/fleet/pull-object", content=b"x", headers={"x-test-stream": "40"}) as streamed:
            data = b"".join(streamed.iter_bytes())
    assert streamed.status_code == 200 and len(data) == 40 * 65536
    assert data[65536 * 39] == 39


# ---- refused ---------------------------------------------------------------------
REFUSED = [
    b"POST /v1/control/start-run",
    b"POST /v1/control/list-runs",
    b"POST /v1/control/stop-run",
    b"POST /v1/control/stream-logs",
    b"POST /v1/control/register-node",
    b"POST /v1/control/unregister-node",
    b"POST /v1/control/list-nodes",
    b"POST /v1/runtime/acquire-task",
    b"POST /v1/runtime/pull-task-input",
    b"POST /v1/runtime/push-messages",
    b"GET /health",
    b"GET /",
    # Fleet self-registration: a site's key is registered by the operator, never by a caller.
    b"POST /v1/fleet/register-node",
    b"POST /v1/fleet/unregister-node",
    # Traversal and other spellings of a path outside the site API.
    b"POST /v1/fleet/../control/list-runs",
    b"POST /v1/fleet/%2e%2e/control/list-runs",
    b"POST /v1/fleet/%2E%2E/control/start-run",
    b"POST /v1/fleet/..%2fcontrol/list-runs",
    b"POST /v1/fleet/..%2Fcontrol/register-node",
    b"POST /v1/fleet/%2e%2e%2fcontrol%2flist-runs",
    b"POST /v1/fleet/pull-messages/../../control/list-runs",
    b"POST //v1/control/list-runs",
    b"POST //v1/fleet/../control/list-runs",
    b"POST /v1/fleet//../control/list-runs",
    b"POST /v1/fleet/./../runtime/acquire-task",
    b"POST /v1/fleet/%2e/pull-messages",
    b"POST https://127.0.0.1/v1/control/list-runs",
    # Spellings of an allowed path that are not the path itself.
    b"POST //v1/fleet/pull-messages",
    b"POST /v1/fleet//pull-messages",
    b"POST /v1/fleet/pull-messages/",
    b"POST /v1/fleet/./pull-messages",
    b"POST /v1/fleet/pull%2dmessages",
    b"POST /V1/FLEET/PULL-MESSAGES",
    b"POST /v1/fleet/pull-messages;x",
    b"POST /v1/fleet/pull-messages?x=1",
    b"POST https://127.0.0.1/v1/fleet/pull-messages",
    # Allowed paths, wrong method.
    b"GET /v1/fleet/pull-messages",
    b"PUT /v1/fleet/push-messages",
    b"DELETE /v1/fleet/get-run",
]


@pytest.mark.parametrize("request_line", REFUSED, ids=[r.decode() for r in REFUSED])
def test_anything_else_is_refused_and_logged(fresh: Door, request_line: bytes):
    status = _raw(fresh, request_line + b" HTTP/1.1", headers=b"flwr-public-key: cHVi\r\n")
    assert status == 403
    assert fresh.upstream.seen == [], "a refused request reached the SuperLink"
    method, target = request_line.split(b" ", 1)
    path = target.split(b"?", 1)[0]
    wait_for(lambda: f"refused {method.decode()} {path!r}" in fresh.output(), 10, "the refusal's log line")


def test_a_superlink_not_signed_by_the_federation_ca_gets_nothing(tmp_path: Path, certs: Path):
    """The loopback hop checks the SuperLink's certificate: a process holding another CA's certificate on the
    internal port (say, after a crash freed it) receives no site traffic."""
    other = tmp_path / "other-ca"
    init_ca(other, ["127.0.0.1"])
    impostor = _serve_upstream(CertPaths(other))
    d = _start_door(tmp_path, "checks-ca", impostor, certs)
    try:
        with _client(d) as client:
            r = client.post("/v1/fleet/pull-messages", content=b"\x08\x01")
        assert r.status_code == 502 and impostor.upstream.seen == []
        assert "CERTIFICATE_VERIFY_FAILED" in d.output()
    finally:
        _stop(d.proc)
        impostor.server.should_exit = True
        impostor.thread.join(timeout=10)


def test_insecure_front_door_also_forwards_self_registration_and_nothing_else(tmp_path: Path):
    upstream = _serve_upstream(None)
    d = _start_door(tmp_path, "insecure", upstream, None)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{d.port}", timeout=30) as client:
            for path in sorted(SELF_REGISTRATION_PATHS | FLEET_PATHS):
                assert client.post(path.decode(), content=b"").status_code == 200
        assert [s["raw_path"] for s in upstream.upstream.seen] == sorted(SELF_REGISTRATION_PATHS | FLEET_PATHS)
        for line in (b"POST /v1/control/list-runs", b"POST /v1/fleet/../control/list-runs", b"POST /v1/runtime/acquire-task"):
            assert _raw(d, line + b" HTTP/1.1") == 403
        assert len(upstream.upstream.seen) == len(SELF_REGISTRATION_PATHS | FLEET_PATHS)
    finally:
        _stop(d.proc)
        upstream.server.should_exit = True
        upstream.thread.join(timeout=10)
