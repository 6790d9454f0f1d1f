"""Only the operator can act as the operator: the sites' port serves the site API and nothing else.

A rogue party holding the federation's ca.pem (every site has one), or even a registered
site's private key, tries every operator action through the port the sites dial: Flower's
own CLI (`flwr ls`, `flwr supernode register`, `flwr run`) and hand-made HTTPS requests to
the Control and Runtime APIs, including path traversal spellings. Every attempt is refused,
and the server's site registry and runs are exactly what they were.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
from base64 import b64encode
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.proto.fleet_pb2 import RegisterNodeFleetRequest
from flwr.proto.node_pb2 import Node
from flwr.proto.run_pb2 import GetRunRequest
from flwr.supercore.date import now
from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

from fedlens.ops.certs import add_site
from fedlens.ops.control import Connection, ControlError
from fedlens.ops.fab import write_app
from fedlens.ops.frontdoor import REFUSAL
from fedlens.ops.procs import wait_for
from fedlens.ops.superlink import server_connection

from .conftest import SITES, Federation

pytestmark = pytest.mark.deployment

# Operator and ServerApp calls a rogue would like to make.
OPERATOR_PATHS = [
    "/v1/control/start-run",
    "/v1/control/list-runs",
    "/v1/control/stop-run",
    "/v1/control/stream-logs",
    "/v1/control/register-node",
    "/v1/control/unregister-node",
    "/v1/control/list-nodes",
    "/v1/runtime/acquire-task",
    "/v1/runtime/pull-task-input",
    "/v1/runtime/push-messages",
    "/v1/runtime/get-nodes",
    # A site's key is registered by the operator, never by the site itself.
    "/v1/fleet/register-node",
    "/v1/fleet/unregister-node",
]
# The same, spelled so that a path-prefix check or a normalising client would let them through.
TRAVERSALS = [
    b"/v1/fleet/../control/list-runs",
    b"/v1/fleet/%2e%2e/control/register-node",
    b"/v1/fleet/%2E%2E/control/start-run",
    b"/v1/fleet/..%2fcontrol/list-runs",
    b"/v1/fleet/..%2Fruntime/acquire-task",
    b"/v1/fleet/pull-messages/../../control/list-nodes",
    b"//v1/control/list-runs",
    b"//v1/fleet/../control/list-runs",
    b"/v1/fleet//../control/unregister-node",
    b"https://127.0.0.1/v1/control/list-runs",
]


def _registry(federation: Federation) -> dict[str, object]:
    r = federation.fedlens("server", "sites", "--state-dir", str(federation.state), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _operator_view(federation: Federation) -> tuple[dict[str, object], list[str], list[object]]:
    """The registry, the SuperLink's node ids and its runs, read the operator's way (loopback)."""
    conn = server_connection(federation.state)
    nodes = sorted(str(n.get("node-id")) for n in conn.nodes())
    return _registry(federation), nodes, list(conn.flwr("ls").get("runs", []))


def _raw(federation: Federation, target: bytes, headers: dict[str, str] | None = None, body: bytes = b"") -> tuple[int, bytes]:
    """POST ``target`` exactly as given, over TLS checked against the federation CA; the status code and body."""
    ctx = ssl.create_default_context(cafile=str(federation.certs / "ca.pem"))
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode()
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", federation.port), timeout=10), server_hostname="127.0.0.1") as tls:
        tls.sendall(
            b"POST " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/protobuf\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n" + extra + b"\r\n" + body
        )
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", data)
    assert match, data[:200]
    return int(match.group(1)), data.partition(b"\r\n\r\n")[2]


def _refused(federation: Federation, target: bytes, headers: dict[str, str] | None = None, body: bytes = b"") -> bool:
    """Whether the front door (not the SuperLink) refused the request."""
    status, reply = _raw(federation, target, headers, body)
    return status == 403 and REFUSAL.encode() in reply


def test_a_rogue_holding_the_ca_can_do_nothing_an_operator_can(federation: Federation, tmp_path: Path):
    before = _operator_view(federation)
    ca = federation.certs / "ca.pem"
    _, other_pub = add_site(tmp_path / "rogue-keys", "other")
    rogue = Connection(federation.address, ca)  # a FLWR_HOME whose only connection is the sites' port

    # Flower's own CLI, pointed at the sites' port.
    app = write_app(tmp_path / "app")
    for args in (("ls",), ("supernode", "list"), ("supernode", "register", str(other_pub)), ("run", str(app)), ("stop", "1")):
        with pytest.raises(ControlError, match=REFUSAL):
            rogue.flwr(*args)

    # Hand-made HTTPS requests (httpx, CA-checked) to every operator and runtime call.
    with httpx.Client(base_url=f"https://{federation.address}", verify=ssl.create_default_context(cafile=str(ca)), timeout=30) as client:
        for path in OPERATOR_PATHS:
            r = client.post(path, content=b"", headers={"content-type": "application/protobuf"})
            assert r.status_code == 403 and REFUSAL in r.json()["detail"], (path, r.status_code, r.text)
        assert client.get("/health").status_code == 403
    # The same calls spelled to slip past a prefix check (sent as raw bytes: no client normalises them).
    for target in TRAVERSALS:
        assert _refused(federation, target), target

    # An operator who dials the sites' port by mistake is told where to go instead.
    r = federation.fedlens("run", "--server", federation.address, "--ca", str(ca), "--set", "num-rounds=1", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and REFUSAL in r.stderr and "--state-dir" in r.stderr, r.stderr

    assert _operator_view(federation) == before  # no site added or removed, no run started
    assert "refused POST b'/v1/control/start-run'" in federation.procs.log("server")


def _signed(key_file: Path) -> tuple[dict[str, str], bytes]:
    """Flower's SuperNode authentication headers, made with ``key_file``; and the key's public bytes."""
    key = load_ssh_private_key(key_file.read_bytes(), password=None)
    public = public_key_to_bytes(key.public_key())  # type: ignore[arg-type]
    timestamp = now().isoformat()
    signature = sign_message(key, timestamp.encode("ascii"))  # type: ignore[arg-type]
    headers = {"flwr-public-key": b64encode(public).decode(), "flwr-timestamp": timestamp, "flwr-signature": b64encode(signature).decode()}
    return headers, public


def test_a_rogue_holding_a_registered_sites_key_can_only_be_that_site(federation: Federation, tmp_path: Path):
    before = _operator_view(federation)
    site_a = int(before[0]["site-a"]["node_id"])  # type: ignore[index]
    key_file = federation.certs / "sites" / "site-a.key"

    # The key works for what a site does: the call passes the front door and the SuperLink's signature check
    # and gets the SuperLink's own answer (a Flower error with its code: there is no run 1).
    headers, public = _signed(key_file)
    get_run = GetRunRequest(node=Node(node_id=site_a), run_id=1).SerializeToString()
    status, reply = _raw(federation, b"/v1/fleet/get-run", headers, get_run)
    assert status != 401 and REFUSAL.encode() not in reply and isinstance(json.loads(reply)["code"], int), (status, reply)

    # ...and for nothing else, whatever the spelling.
    _, other_pub = add_site(tmp_path / "rogue-keys", "other")
    register_other = RegisterNodeFleetRequest(public_key=other_pub.read_bytes()).SerializeToString()
    register_self = RegisterNodeFleetRequest(public_key=public).SerializeToString()
    for path in OPERATOR_PATHS:
        headers, _ = _signed(key_file)
        body = register_self if path == "/v1/fleet/register-node" else register_other
        assert _refused(federation, path.encode(), headers, body), path
    for target in TRAVERSALS:
        headers, _ = _signed(key_file)
        assert _refused(federation, target, headers, register_other), target

    assert _operator_view(federation) == before


def test_sites_are_named_by_the_registry_not_by_what_they_call_themselves(federation: Federation, tmp_path: Path):
    """site-a's key, started under the name of site-b: reports still say site-a (the key registered as site-a)."""
    federation.start_site("site-a", "--name", "site-b")
    federation.start_site("site-b")
    wait_for(lambda: {"site-a", "site-b"} <= federation.online(), 90, "two sites online")
    out = tmp_path / "run"
    run = federation.start_run(out, **{"num-rounds": 1, "min-sites": 2})
    assert run.wait(timeout=600) == 0, federation.procs.log("run")[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sites"] == ["site-a", "site-b"] and set(summary["privacy"]["sites"]) == {"site-a", "site-b"}
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(record["sites_train"]) == {"site-a", "site-b"}
    assert set(SITES) - set(summary["sites"]) == {"site-c"}
