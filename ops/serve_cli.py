"""``fedlens serve``: the image-recognition HTTP service (uvicorn over :mod:`fedlens.ops.serve`)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import stat
import sys
from pathlib import Path
from typing import Any

from fedlens.shared.errors import FedlensError

__all__ = ["add_commands"]

_log = logging.getLogger("fedlens.serve")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def _read_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
        mode = path.stat().st_mode
    except OSError as exc:
        raise FedlensError(f"--token-file {path}: cannot read it ({exc.strerror})") from exc
    if len(token) < 16:
        raise FedlensError(f"--token-file {path}: the token must be at least 16 characters (e.g. `openssl rand -hex 32 > {path}`)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        _log.warning("--token-file %s is readable by other users; `chmod 600 %s`", path, path)
    return token


def _runtime(model: Path, asked: str) -> str:
    from fedlens.shared.inference import FP32_FILE

    is_onnx = model.suffix.lower() == ".onnx"
    if asked == "auto":
        return "onnx" if is_onnx else "torch"
    if asked == "onnx" and not is_onnx:
        raise FedlensError(
            f"--runtime onnx serves an exported model: run `fedlens export --model {model} --out DIR` and serve DIR/{FP32_FILE} "
            "(or DIR/model.int8.onnx)"
        )
    if asked == "torch" and is_onnx:
        raise FedlensError(f"--runtime torch needs a fedlens checkpoint (model.safetensors), not the ONNX file {model}")
    return asked


def _cmd_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from fedlens.shared.config import DEFAULT_MAX_IMAGE_PIXELS

    from .serve import ServeOptions, Service, build_app

    public = not _is_loopback(args.host)
    if public and not args.token_file and not args.insecure_public:
        raise FedlensError(
            f"--host {args.host} is reachable from other machines: give --token-file FILE (a bearer token), and put the service "
            "behind a TLS reverse proxy (docs/inference.md); --insecure-public serves it without a token anyway"
        )
    for name, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 1), ("--port", args.port, 0)):
        if value < low:
            raise FedlensError(f"{name} must be at least {low}, got {value}")
    if args.max_wait_ms < 0 or args.max_upload_mb <= 0:
        raise FedlensError("--max-wait-ms must be >= 0 and --max-upload-mb > 0")
    threads = args.threads or None
    if threads:
        torch.set_num_threads(threads)
    options = ServeOptions(
        model=args.model,
        runtime=_runtime(args.model, args.runtime),  # type: ignore[arg-type]
        device=args.device,
        threads=threads,
        name=args.name,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS,
        top_k=args.top_k,
        token=_read_token(args.token_file) if args.token_file else None,
        explain_model=args.explain_model,
        watch_interval=args.watch_interval,
    )
    service = Service(options)  # loads the model: a bad --model fails here, before the port is bound
    m = service.model
    card = m.predictor.card
    host = f"[{args.host}]" if ":" in args.host else args.host
    _log.info("fedlens serve: http://%s:%d/  (API: /openapi.json, metrics: /metrics)", host, args.port)
    _log.info(
        "model %s version %s (%s, %s, %d classes, %s px, %s rounds) on %s; watching %s for new versions",
        m.file,
        m.version,
        m.predictor.backend,
        card.get("backbone"),
        len(m.predictor.classes),
        m.image_size,
        card.get("rounds"),
        args.device,
        args.model,
    )
    _log.info(
        "batching: max-batch %d, max-wait %g ms, queue %d requests; uploads up to %g MB, images up to %d px; token %s",
        options.max_batch,
        options.max_wait_ms,
        options.max_queue,
        args.max_upload_mb,
        options.max_pixels,
        "required" if options.token else "off",
    )
    if public and not options.token:
        _log.warning("serving on %s WITHOUT a token (--insecure-public): anyone who reaches this port can use the model", args.host)
    config = uvicorn.Config(
        build_app(service),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
        # Longer than a reverse proxy's or client pool's idle timeout (often 60 s), so the server is
        # not the side that closes an idle connection at the moment the other side reuses it.
        timeout_keep_alive=75,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )
    # uvicorn stops on SIGTERM and SIGINT: it stops accepting, lets running requests finish
    # (at most 10 s), then the app's lifespan stops the watcher and the inference worker.
    # The inference thread gives up the GIL inside the model and needs it back to hand over the
    # result; at Python's default 5 ms switch interval it can wait that long behind the event loop.
    sys.setswitchinterval(0.0005)
    uvicorn.Server(config).run()
    return 0


def add_commands(sub: Any) -> None:
    """Register ``serve`` on the ``fedlens`` sub-command parser."""
    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP (KServe V2 API, /predict, metrics, a page for people), with hot reload",
        description="Serve a fedlens model: KServe V2 health/metadata/inference, POST /predict (multipart or base64 JSON, "
        "top-k labels, ?explain=gradcam|ig|occlusion), Prometheus /metrics, /openapi.json and a page at /. Point --model "
        "at a site's state folder and every new global model is loaded, checked and swapped in without a restart.",
        epilog="Listens on loopback by default. A non-loopback --host needs --token-file (or --insecure-public); put it "
        "behind a TLS reverse proxy (docs/inference.md).",
    )
    p.add_argument(
        "--model",
        type=Path,
        required=True,
        metavar="MODEL",
        help="a site's state folder (its global-model.safetensors), a run folder, model.safetensors, or a model.onnx / "
        "model.int8.onnx from `fedlens export`; the file is watched for new versions",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="where the model runs (default auto: CUDA if visible)")
    p.add_argument(
        "--runtime",
        choices=("auto", "torch", "onnx"),
        default="auto",
        help="auto (default): ONNX Runtime for a .onnx file, PyTorch for a checkpoint",
    )
    p.add_argument("--threads", type=int, default=0, help="intra-op threads of PyTorch / ONNX Runtime (default 0: their own choice)")
    p.add_argument("--max-batch", type=int, default=16, help="images per inference batch (default 16; 1 turns batching off)")
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=0.0,
        help="how long a batch waits for more requests (default 0: batches form from what queued while the previous one ran; "
        "a few ms help a GPU)",
    )
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more get 503 with Retry-After (default 64)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body in MB (default 20); larger: 413")
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=None,
        help="images with more pixels are refused from their header (decompression bombs): 413 (default: the config's max-image-pixels)",
    )
    p.add_argument("--top-k", type=int, default=3, help="labels per image when the request does not say (default 3)")
    p.add_argument("--name", default="fedlens", help="the model's name in the V2 API, /v2/models/NAME (default fedlens)")
    p.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="require 'Authorization: Bearer <token>' (the file's content) on every route but liveness and the page",
    )
    p.add_argument("--insecure-public", action="store_true", help="allow a non-loopback --host without a token")
    p.add_argument(
        "--explain-model",
        type=Path,
        metavar="MODEL",
        help="the PyTorch checkpoint for explanations when serving ONNX (default: the one named in the ONNX model card)",
    )
    p.add_argument(
        "--ssl-certfile", metavar="PEM", help="serve HTTPS with this certificate chain (uvicorn); a reverse proxy is the usual way"
    )
    p.add_argument("--ssl-keyfile", metavar="PEM", help="the private key of --ssl-certfile")
    p.add_argument("--watch-interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_serve)
