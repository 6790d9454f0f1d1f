"""The front door: the only thing listening on the port the sites dial.

Flower 1.42 serves the Fleet API (what a SuperNode calls), the Control API (run
submission, node registration; no authentication) and the Runtime API (what the
ServerApp calls) on one port. ``fedlens server start`` therefore runs the SuperLink
on loopback and puts this reverse proxy on the public address. It forwards a request
only when its raw request path, the bytes as received and before any decoding or
dot-segment normalisation, equals one of the Fleet paths a SuperNode uses, with the
method it uses (``POST``). Everything else is refused with 403 and a log line, so
``/v1/fleet/../control/list-runs``, ``/v1/fleet/%2e%2e/...``, ``..%2f`` and ``//``
spellings never reach the SuperLink's router.

Forwarded requests keep their headers (SuperNode authentication is a signature in
per-request headers), bodies and streaming in both directions; the answer keeps the
SuperLink's status code and headers.

Run as ``python -m fedlens.ops.frontdoor`` (``fedlens server start`` does that).
"""

from __future__ import annotations

import argparse
import json
import logging
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

__all__ = ["FLEET_PATHS", "SELF_REGISTRATION_PATHS", "REFUSAL", "FrontDoor", "FrontDoorSettings", "allowed_paths", "serve", "main"]

_log = logging.getLogger("fedlens.server.frontdoor")

# The Fleet API calls a SuperNode makes (flwr/supernode/fleet_http_client.py, served by
# flwr/superlink/routers/fleet/router.py), all POST. A SuperNode holding an
# authentication key never registers or unregisters itself: its key is registered by
# the operator (`fedlens server add-site`), and the SuperLink refuses Fleet
# registration while site authentication is on.
FLEET_PATHS = frozenset(
    {
        b"/v1/fleet/activate-node",
        b"/v1/fleet/deactivate-node",
        b"/v1/fleet/send-node-heartbeat",
        b"/v1/fleet/pull-messages",
        b"/v1/fleet/push-messages",
        b"/v1/fleet/get-run",
        b"/v1/fleet/get-fab",
        b"/v1/fleet/push-object",
        b"/v1/fleet/pull-object",
        b"/v1/fleet/confirm-message-received",
    }
)
# Without site authentication (--insecure) a SuperNode makes up a key and registers it.
SELF_REGISTRATION_PATHS = frozenset({b"/v1/fleet/register-node", b"/v1/fleet/unregister-node"})
METHOD = "POST"

# The start of every refusal's message. The body is `{"detail": message}`, which Flower's CLI
# prints as the error, and `fedlens run` recognises, to say what to do instead.
REFUSAL = "fedlens front door: refused"
_REFUSAL_BODY = json.dumps(
    {
        "detail": f"{REFUSAL}: this port serves the site (Fleet) API only. Operator commands (fedlens run, "
        "fedlens server add-site/remove-site/sites) reach the server on its loopback port, on the server host: "
        "`fedlens run --state-dir STATE_DIR ...`"
    }
).encode()

# Hop-by-hop headers (RFC 9110 section 7.6.1) describe one connection, not the message.
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection", b"te", b"trailer"}
    | {b"transfer-encoding", b"upgrade"}
)
# The SuperLink's uvicorn believes X-Forwarded-For from 127.0.0.1, i.e. from this proxy:
# a caller's own forwarding headers are dropped and the real peer is sent instead.
_FORWARDING = frozenset({b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port", b"x-real-ip"})

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def allowed_paths(*, self_registration: bool) -> frozenset[bytes]:
    """The raw paths the front door forwards.

    Parameters
    ----------
    self_registration : bool
        Also forward Fleet node (un)registration: only for servers without site
        authentication (``--insecure``), whose sites register made-up keys.
    """
    return FLEET_PATHS | SELF_REGISTRATION_PATHS if self_registration else FLEET_PATHS


class _ClientGone(Exception):
    """The caller disconnected while its request body was being forwarded."""


class FrontDoor:
    """An ASGI app forwarding the allowed Fleet calls to ``upstream`` and refusing the rest.

    Parameters
    ----------
    upstream : str
        Base URL of the SuperLink, e.g. ``https://127.0.0.1:9093``.
    allowed : frozenset of bytes
        Raw request paths to forward (:func:`allowed_paths`).
    verify : ssl.SSLContext or bool
        How to check the SuperLink's certificate (``False`` only for plaintext).
    """

    def __init__(self, upstream: str, allowed: frozenset[bytes], verify: ssl.SSLContext | bool) -> None:
        self.upstream = upstream.rstrip("/")
        self.allowed = allowed
        self.verify = verify
        self._client: httpx.AsyncClient | None = None

    def refusal_reason(self, scope: Scope) -> str | None:
        """Why the request in ``scope`` must not be forwarded, or None when it may."""
        raw_path = scope.get("raw_path")
        if not isinstance(raw_path, bytes) or raw_path not in self.allowed:
            return "not a site API path"
        if scope.get("query_string"):
            return "a site API call carries no query string"
        if scope.get("method") != METHOD:
            return f"site API calls are {METHOD}"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            reason = self.refusal_reason(scope)
            if reason is None:
                await self._forward(scope, receive, send)
            else:
                client = scope.get("client") or ("?", 0)
                _log.warning("refused %s %r from %s:%s (%s)", scope.get("method"), scope.get("raw_path", b""), client[0], client[1], reason)
                await _reply(send, 403, _REFUSAL_BODY, b"application/json")
        # Any other scope (websocket) is not served: uvicorn runs with websockets off.

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        import httpx

        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # trust_env=False: a proxy from the environment (HTTPS_PROXY) must never sit on the loopback hop.
                self._client = httpx.AsyncClient(
                    verify=self.verify,
                    trust_env=False,
                    follow_redirects=False,
                    timeout=httpx.Timeout(connect=10.0, read=300.0, write=300.0, pool=60.0),
                    limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        import httpx

        assert self._client is not None, "the front door serves requests only after its lifespan started"
        client = scope.get("client") or ("", 0)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_BY_HOP | _FORWARDING and k.lower() != b"host"]
        if client[0]:
            headers.append((b"x-forwarded-for", str(client[0]).encode("ascii")))
        has_length = any(k.lower() == b"content-length" for k, _ in headers)
        body = _request_body(receive) if has_length or _chunked(scope) else None
        request = self._client.build_request(METHOD, self.upstream + scope["raw_path"].decode("ascii"), headers=headers, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except _ClientGone:
            return
        except httpx.HTTPError as exc:
            _log.error("the SuperLink at %s did not answer %s: %s", self.upstream, scope["raw_path"].decode("ascii"), exc)
            await _reply(send, 502, b"fedlens front door: the server is not available; try again shortly\n", b"text/plain; charset=utf-8")
            return
        try:
            out_headers = [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP_BY_HOP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out_headers})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


def _chunked(scope: Scope) -> bool:
    return any(k.lower() == b"transfer-encoding" for k, _ in scope["headers"])


async def _request_body(receive: Receive) -> AsyncIterator[bytes]:
    """The caller's request body, chunk by chunk as it arrives."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        if chunk := message.get("body", b""):
            yield chunk
        if not message.get("more_body", False):
            return


async def _reply(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def upstream_tls(ca: Path) -> ssl.SSLContext:
    """How the front door checks the SuperLink's certificate: signed by the federation CA.

    The hostname is not checked: the SuperLink listens on 127.0.0.1, and a
    certificate's names may not include that address (``fedlens certs init`` adds it,
    a hand-made certificate may not). Verifying the chain against the federation's
    CA is what matters on this hop: whatever answers on the internal port holds a key
    the federation CA signed, so a local process that grabbed the port after a
    SuperLink crash cannot pose as the server and read the sites' traffic.
    """
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@dataclass(frozen=True)
class FrontDoorSettings:
    """Where the front door listens and where it forwards to."""

    host: str
    port: int
    upstream_port: int
    cert: Path | None = None  # the server certificate and key; None only with insecure
    key: Path | None = None
    ca: Path | None = None
    insecure: bool = False


def build_app(s: FrontDoorSettings) -> FrontDoor:
    """The front door for ``s``: HTTPS to the SuperLink checked against the CA, or plaintext with ``insecure``."""
    if s.insecure:
        return FrontDoor(f"http://127.0.0.1:{s.upstream_port}", allowed_paths(self_registration=True), verify=False)
    if s.ca is None:
        raise ValueError("the front door needs the federation CA to check the SuperLink's certificate")
    return FrontDoor(f"https://127.0.0.1:{s.upstream_port}", allowed_paths(self_registration=False), verify=upstream_tls(s.ca))


def serve(s: FrontDoorSettings) -> None:
    """Serve the front door in the foreground until SIGTERM/SIGINT."""
    import uvicorn

    config = uvicorn.Config(
        build_app(s),
        host=s.host,
        port=s.port,
        # h11 hands over the request target's path bytes untouched (`raw_path`); an
        # absolute-form target (`POST https://x/v1/fleet/...`) then matches nothing.
        http="h11",
        ws="none",
        lifespan="on",
        proxy_headers=False,
        server_header=False,
        date_header=False,
        access_log=False,
        log_config=None,
        ssl_certfile=None if s.insecure else str(s.cert),
        ssl_keyfile=None if s.insecure else str(s.key),
    )
    _log.info(
        "front door on %s:%d (%s) forwarding the site API to the SuperLink on 127.0.0.1:%d",
        s.host,
        s.port,
        "plaintext" if s.insecure else "TLS",
        s.upstream_port,
    )
    uvicorn.Server(config).run()


def main(argv: list[str] | None = None) -> int:
    """``python -m fedlens.ops.frontdoor``: the process ``fedlens server start`` runs on the public port."""
    p = argparse.ArgumentParser(prog="python -m fedlens.ops.frontdoor", description=__doc__.splitlines()[0])
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream-port", type=int, required=True, help="the SuperLink's port on 127.0.0.1")
    p.add_argument("--cert", type=Path)
    p.add_argument("--key", type=Path)
    p.add_argument("--ca", type=Path)
    p.add_argument("--insecure", action="store_true")
    args = p.parse_args(argv)
    if not args.insecure and not (args.cert and args.key and args.ca):
        p.error("give --cert, --key and --ca (or --insecure)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per forwarded call otherwise; the SuperLink logs them
    serve(FrontDoorSettings(args.host, args.port, args.upstream_port, args.cert, args.key, args.ca, args.insecure))
    return 0


if __name__ == "__main__":
    sys.exit(main())
