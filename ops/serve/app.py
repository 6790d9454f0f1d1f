"""The HTTP API (FastAPI): KServe V2 health, metadata and inference, a multipart/JSON ``/predict``,
Prometheus ``/metrics`` and the page at ``/``.

Routes answer JSON errors ``{"error": "..."}`` with the status that says what went wrong:
401 without the token, 413 too large, 415 not an image, 422 a broken one, 503 when the
queue is full or an explanation is already running (with ``Retry-After``).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedlens.shared.config import DEFAULT_MAX_IMAGE_PIXELS
from fedlens.shared.explain import get_method
from fedlens.shared.inference import top_k

from .batching import Batcher, QueueFull
from .explain import ALIASES, ExplainBusy, Explainer, ExplainUnavailable, method_name
from .images import BadImage, ImageSpool, decode_base64
from .metrics import ServeMetrics
from .page import page_html
from .reload import ModelWatcher, ServedModel, load_served

__all__ = ["ServeOptions", "Service", "build_app"]

_log = logging.getLogger("fedlens.serve")

LIVE = "/v2/health/live"
# Requests that need no token: liveness (for orchestrators) and the page itself (it holds no data; its
# calls to the API carry the token).
_OPEN_PATHS = frozenset({LIVE, "/"})


@dataclass(frozen=True)
class ServeOptions:
    """Everything ``fedlens serve`` is started with (see ``fedlens serve --help``)."""

    model: Path
    runtime: Literal["torch", "onnx"] = "torch"
    device: str = "cpu"
    threads: int | None = None
    name: str = "fedlens"
    max_batch: int = 16
    max_wait_ms: float = 0.0
    max_queue: int = 64
    max_upload_bytes: int = 20 * 1024 * 1024
    max_images: int = 64
    max_explain_images: int = 4
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    top_k: int = 3
    token: str | None = None
    explain_model: Path | None = None
    watch_interval: float = 1.0
    retry_after_s: int = 1


class Service:
    """The served model, its watcher, the batcher, the explainer and the metrics: one per app.

    Loads the model when constructed, so a bad ``--model`` fails before the port is bound.
    """

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.metrics = ServeMetrics()

        def load(file: Path) -> ServedModel:
            return load_served(file, runtime=options.runtime, device=options.device, threads=options.threads)

        self.watcher = ModelWatcher(options.model, load, interval=options.watch_interval, on_event=self._model_event)
        self.batcher = Batcher(
            lambda: self.watcher.current,
            max_batch=options.max_batch,
            max_wait_ms=options.max_wait_ms,
            max_queue=options.max_queue,
            on_batch=self.metrics.batch_size.observe,
        )
        self.spool = ImageSpool(max_pixels=options.max_pixels)
        self.explainer = Explainer(checkpoint=options.explain_model, running=self.metrics.explaining)
        self.ready = False
        self.metrics.queue_depth.set_function(lambda: self.batcher.depth)
        self._model_event("started")

    @property
    def model(self) -> ServedModel:
        return self.watcher.current

    def _model_event(self, event: str) -> None:
        m = self.watcher.current
        if event != "started":
            self.metrics.reloads.labels(outcome=event).inc()
        self.metrics.model.info({"version": m.version, "backend": m.predictor.backend, "file": str(m.file)})
        if event != "failed":
            self.metrics.model_loaded.set(time.time())
        self.metrics.reload_error.set(1 if self.watcher.last_error else 0)

    async def start(self) -> None:
        await self.batcher.start()
        self.watcher.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        self.watcher.stop()
        await self.batcher.stop()
        self.explainer.close()
        self.spool.close()
        _log.info("fedlens serve: stopped (model version %s, %d reload(s))", self.model.version, self.watcher.reloads)


class _Error(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers or {}


class _TooLarge(Exception):
    pass


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _Guard:
    """ASGI middleware: the token check, the upload size limit, and per-route request metrics."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app, self.service = app, service
        token = service.options.token
        self._expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path: str = scope["path"]
        route = _route_label(path)
        status = {"code": 500}
        sent = {"started": False}

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], sent["started"] = message["status"], True
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await _drain(receive, 2 * self.service.options.max_upload_bytes)
                await refusal(scope, receive, send_counted)
                return
            await self.app(scope, self._limited(receive), send_counted)
        except _TooLarge:
            if sent["started"]:
                raise
            self.service.metrics.rejected.labels(reason="too large").inc()
            await _drain(receive, 2 * self.service.options.max_upload_bytes)
            await _error(413, self._too_large())(scope, receive, send_counted)
        finally:
            m = self.service.metrics
            m.requests.labels(route=route, status=str(status["code"])).inc()
            m.latency.labels(route=route).observe(time.perf_counter() - started)

    def _too_large(self) -> str:
        limit = self.service.options.max_upload_bytes
        return f"request body over the upload limit of {limit / 1e6:.1f} MB (--max-upload-mb)"

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        headers = dict(scope["headers"])
        if self._expected is not None and scope["path"] not in _OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                return _error(401, "missing or wrong token: send 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.service.options.max_upload_bytes:
            self.service.metrics.rejected.labels(reason="too large").inc()
            return _error(413, self._too_large())
        return None

    def _limited(self, receive: Receive) -> Receive:
        limit, seen = self.service.options.max_upload_bytes, 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return message

        return counted


# Uploads up to this size are decoded on the event loop; larger ones in a worker thread.
_INLINE_DECODE_BYTES = 64 * 1024


async def _drain(receive: Receive, cap: int) -> None:
    """Read and drop the rest of a refused request body before answering, at most ``cap`` bytes
    (the refusal goes to a client that has finished sending; a larger body is left to the server)."""
    seen = 0
    while seen <= cap:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        seen += len(message.get("body", b""))


_ROUTES = ("/", LIVE, "/v2/health/ready", "/v2", "/predict", "/metrics", "/openapi.json")


def _route_label(path: str) -> str:
    """A bounded label for metrics: the route's template, never a client-chosen path."""
    if path in _ROUTES:
        return path
    if path.startswith("/v2/models/"):
        tail = path.rstrip("/").rsplit("/", 1)[-1]
        return "/v2/models/{name}/" + tail if tail in ("infer", "ready") else "/v2/models/{name}"
    return "other"


class V2Tensor(BaseModel):
    """A tensor of KServe's V2 inference protocol."""

    name: str = Field(description="input name (any; `images` by convention)")
    shape: list[int] = Field(description="UINT8: [B, C, H, W] or [C, H, W] (C = 1 or 3); BYTES: [B]")
    datatype: Literal["UINT8", "BYTES"] = Field(description="UINT8: decoded pixels; BYTES: image files (PNG, JPEG, ...), base64")
    data: list[Any] = Field(description="row-major values (flat or nested), or base64 strings for BYTES")


class V2InferRequest(BaseModel):
    """A V2 inference request: one input tensor of images; ``parameters.top_k`` (default 3)."""

    id: str | None = None
    inputs: list[V2Tensor] = Field(min_length=1, max_length=1)
    parameters: dict[str, Any] = Field(default_factory=dict)


class PredictJSON(BaseModel):
    """``POST /predict`` as JSON: image files as base64 strings (a ``data:`` URL prefix is accepted)."""

    images: list[str] = Field(min_length=1)
    top_k: int | None = None
    explain: str | None = None


_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "description": "one or several image files (any field name)",
                }
            },
            "application/json": {"schema": PredictJSON.model_json_schema()},
        },
    }
}


def _top(probs: np.ndarray, classes: tuple[str, ...], k: int) -> list[list[dict[str, Any]]]:
    return [[{"label": label, "probability": round(p, 6)} for label, p in row] for row in top_k(probs, classes, k)]


def _model_info(model: ServedModel, name: str) -> dict[str, Any]:
    return {"name": name, "version": model.version, "backend": model.predictor.backend, "loaded_at": model.loaded_at}


def _privacy_line(card: dict[str, Any]) -> str:
    if card.get("private") is None:
        return "privacy unknown (no run summary next to the model)"
    return (
        "private (DP-SGD at every site)"
        if card["private"]
        else f"NOT private: {card.get('privacy_reason') or 'some site trained without DP-SGD'}"
    )


def build_app(service: Service) -> FastAPI:
    """The FastAPI app over ``service`` (started and stopped with the app's lifespan)."""
    opts = service.options

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="fedlens serve",
        summary="Image recognition with a federated, differentially private model",
        version=_package_version(),
        lifespan=lifespan,
        docs_url=None,  # FastAPI's /docs loads Swagger UI from a CDN: nothing external is served
        redoc_url=None,
    )

    @app.exception_handler(_Error)
    async def _on_error(_request: Request, exc: _Error) -> JSONResponse:
        return _error(exc.status, str(exc), exc.headers)

    @app.exception_handler(BadImage)
    async def _on_bad_image(_request: Request, exc: BadImage) -> JSONResponse:
        service.metrics.rejected.labels(reason="bad image").inc()
        return _error(exc.status, str(exc))

    def busy(message: str) -> _Error:
        return _Error(503, message, {"Retry-After": str(opts.retry_after_s)})

    async def decode_all(items: list[tuple[bytes, str]]) -> list[np.ndarray]:
        if not items:
            raise _Error(422, "no image in the request: send image files as multipart/form-data, or base64 strings in JSON")
        if len(items) > opts.max_images:
            raise _Error(413, f"{len(items)} images in one request; at most {opts.max_images}")
        transform = service.model.predictor.transform

        def run() -> list[np.ndarray]:
            return [service.spool.decode(data, transform, what) for data, what in items]

        if sum(len(data) for data, _what in items) <= _INLINE_DECODE_BYTES:
            return run()  # a small image decodes in about a millisecond: cheaper than a thread hop
        return await run_in_threadpool(run)

    async def infer(images: list[np.ndarray]) -> tuple[np.ndarray, ServedModel]:
        try:
            result = await service.batcher.submit(images)
        except QueueFull as exc:
            service.metrics.rejected.labels(reason="queue full").inc()
            raise busy(f"busy: {exc}; retry after {opts.retry_after_s} s") from None
        service.metrics.images.inc(len(images))
        return result.probabilities, result.model

    def parse_k(value: Any, model: ServedModel) -> int:
        if value is None:
            return min(opts.top_k, len(model.predictor.classes))
        try:
            k = int(value)
        except (TypeError, ValueError):
            raise _Error(422, f"top_k must be a whole number, got {value!r}") from None
        if k < 1:
            raise _Error(422, f"top_k must be at least 1, got {k}")
        return min(k, len(model.predictor.classes))

    def parse_method(value: str | None) -> str | None:
        if not value:
            return None
        try:
            return method_name(value)
        except ValueError:
            raise _Error(422, f"unknown explanation {value!r}; choose from {', '.join(_explain_choices())}") from None

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        m = service.model
        methods = {alias: get_method(name).title for alias, name in ALIASES.items()} | {"occlusion": get_method("occlusion").title}
        return HTMLResponse(
            page_html(name=opts.name, classes=list(m.predictor.classes), methods=methods, private=_privacy_line(m.predictor.card))
        )

    @app.get(LIVE, tags=["health"], summary="Liveness (KServe V2): the process answers")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready", tags=["health"], summary="Readiness (KServe V2): a model is loaded and the worker runs")
    async def ready() -> JSONResponse:
        return JSONResponse({"ready": service.ready}, status_code=200 if service.ready else 503)

    @app.get("/v2", tags=["metadata"], summary="Server metadata (KServe V2)")
    async def server_meta() -> dict[str, Any]:
        return {"name": "fedlens", "version": _package_version(), "extensions": []}

    def check_name(name: str) -> None:
        if name != opts.name:
            raise _Error(404, f"no model {name!r} here; this service serves {opts.name!r}")

    @app.get("/v2/models/{name}", tags=["metadata"], summary="Model metadata (KServe V2) with the model card and its privacy")
    async def model_meta(name: str) -> dict[str, Any]:
        check_name(name)
        m = service.model
        size = m.image_size
        return {
            "name": opts.name,
            "versions": [m.version],
            "platform": "pytorch" if m.predictor.backend == "torch" else "onnxruntime_onnx",
            "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, -1, -1, -1]}],
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(m.predictor.classes)]},
                {"name": "labels", "datatype": "BYTES", "shape": [-1, -1]},
            ],
            "fedlens": {
                **_model_info(m, opts.name),
                "file": str(m.file),
                "watching": str(opts.model),
                "image_size": size,
                "classes": list(m.predictor.classes),
                "card": m.predictor.card,
                "reloads": service.watcher.reloads,
                "last_reload_error": service.watcher.last_error,
                "batching": {"max_batch": opts.max_batch, "max_wait_ms": opts.max_wait_ms, "max_queue": opts.max_queue},
                "limits": {"max_upload_bytes": opts.max_upload_bytes, "max_image_pixels": opts.max_pixels, "max_images": opts.max_images},
            },
        }

    @app.get("/v2/models/{name}/ready", tags=["health"], summary="Model readiness (KServe V2)")
    async def model_ready(name: str) -> JSONResponse:
        check_name(name)
        return JSONResponse({"name": opts.name, "ready": service.ready}, status_code=200 if service.ready else 503)

    @app.post("/v2/models/{name}/infer", tags=["inference"], summary="Inference (KServe V2): class probabilities and top-k labels")
    async def v2_infer(name: str, body: V2InferRequest) -> dict[str, Any]:
        check_name(name)
        tensor = body.inputs[0]
        model = service.model
        k = parse_k(body.parameters.get("top_k"), model)
        if tensor.datatype == "BYTES":
            if len(tensor.data) != int(np.prod(tensor.shape)) or not all(isinstance(d, str) for d in tensor.data):
                raise _Error(422, f"BYTES input: shape {tensor.shape} with {len(tensor.data)} base64 strings")
            images = await decode_all([(decode_base64(d, f"image {i}"), f"image {i}") for i, d in enumerate(tensor.data)])
        else:
            images = await run_in_threadpool(_uint8_images, tensor, service, opts.max_images)
        probs, served = await infer(images)
        return {
            "model_name": opts.name,
            "model_version": served.version,
            "id": body.id,
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape), "data": probs.ravel().round(6).tolist()},
                {
                    "name": "labels",
                    "datatype": "BYTES",
                    "shape": [len(probs), k],
                    "data": [label for row in top_k(probs, served.predictor.classes, k) for label, _p in row],
                },
            ],
            "parameters": {"classes": list(served.predictor.classes)},
        }

    @app.post(
        "/predict",
        tags=["inference"],
        summary="Top-k labels for one or several image files (multipart upload, or base64 in JSON)",
        description="Query: `top_k` (default 3), `explain=gradcam|ig|occlusion` (an attribution overlay per image, "
        f"PNG data URL; at most {opts.max_explain_images} images, one explanation at a time).",
        openapi_extra=_PREDICT_BODY,
    )
    async def predict(request: Request) -> dict[str, Any]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        params = request.query_params
        top_k_raw: Any = params.get("top_k")
        explain_raw = params.get("explain")
        if kind == "multipart/form-data":
            items = await _multipart(request, opts.max_images)
        elif kind == "application/json":
            try:
                doc = PredictJSON.model_validate_json(await request.body())
            except ValueError as exc:
                raise _Error(422, f'JSON body: {_short(exc)}; expected {{"images": [base64, ...]}}') from None
            items = [(decode_base64(s, f"image {i}"), f"image {i}") for i, s in enumerate(doc.images)]
            top_k_raw = doc.top_k if doc.top_k is not None else top_k_raw
            explain_raw = doc.explain or explain_raw
        else:
            raise _Error(
                415, f'send image files as multipart/form-data, or JSON {{"images": [base64, ...]}}; got {kind or "no content type"}'
            )
        model = service.model
        k = parse_k(top_k_raw, model)
        method = parse_method(explain_raw)
        if method and len(items) > opts.max_explain_images:
            raise _Error(422, f"explanations for at most {opts.max_explain_images} images per request, got {len(items)}")
        images = await decode_all(items)
        probs, served = await infer(images)
        predictions: list[dict[str, Any]] = [{"top": row} for row in _top(probs, served.predictor.classes, k)]
        if method:
            try:
                explained = await service.explainer.explain(served, images, [int(i) for i in probs.argmax(1)], method)
            except ExplainBusy as exc:
                service.metrics.rejected.labels(reason="explain busy").inc()
                raise busy(f"busy: {exc}; retry after {opts.retry_after_s} s (or ask without ?explain)") from None
            except ExplainUnavailable as exc:
                raise _Error(409, str(exc)) from None
            for p, e in zip(predictions, explained):
                p["explanation"] = e
        return {"model": _model_info(served, opts.name), "top_k": k, "predictions": predictions}

    @app.get("/metrics", tags=["metrics"], summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(_Guard, service=service)
    return app


async def _multipart(request: Request, max_images: int) -> list[tuple[bytes, str]]:
    try:
        form = await request.form(max_files=max_images, max_fields=16)
    except MultiPartException as exc:
        raise _Error(422, f"multipart body: {exc}") from None
    items: list[tuple[bytes, str]] = []
    try:
        for field, value in form.multi_items():
            if not isinstance(value, str):
                items.append((await value.read(), value.filename or field))
    finally:
        await form.close()
    return items


def _uint8_images(tensor: V2Tensor, service: Service, max_images: int) -> list[np.ndarray]:
    shape = tensor.shape
    if len(shape) == 3:
        shape = [1, *shape]
    if len(shape) != 4 or shape[1] not in (1, 3) or min(shape) < 1:
        raise _Error(422, f"UINT8 input: shape [B, C, H, W] or [C, H, W] with C = 1 or 3, got {tensor.shape}")
    if shape[0] > max_images:
        raise _Error(413, f"{shape[0]} images in one request; at most {max_images}")
    try:
        flat = np.asarray(tensor.data, dtype=np.int64).ravel()
    except (ValueError, TypeError, OverflowError):
        raise _Error(422, "UINT8 input: data must be whole numbers 0-255 (flat or nested lists)") from None
    if flat.size != int(np.prod(shape)):
        raise _Error(422, f"UINT8 input: shape {tensor.shape} needs {int(np.prod(shape))} values, got {flat.size}")
    if flat.size and (flat.min() < 0 or flat.max() > 255):
        raise _Error(422, "UINT8 input: values must be 0-255")
    arr = flat.astype(np.uint8).reshape(shape)
    transform = service.model.predictor.transform
    return [service.spool.from_tensor(a, transform, f"image {i}") for i, a in enumerate(arr)]


def _explain_choices() -> list[str]:
    from fedlens.shared.explain import method_names

    return [*ALIASES, *method_names()]


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedlens")
    except PackageNotFoundError:
        return "0+unknown"
