"""``fedlens serve`` over HTTP on loopback: latency, throughput with and without batching, a bounded load test.

The model is the default config's (EfficientNet-Lite0 with ImageNet weights, ``last-1``
with rank-16 adapters, 96 px, the 10 Fashion-MNIST classes) exported to ONNX fp32 by
``fedlens export``; pass ``--model`` for a trained run, or let the script write the default
model as initialised (same graph, same cost; its answers are not meaningful). The client
is an asyncio httpx client in this process, posting one Fashion-MNIST test image (PNG)
per request as multipart to ``POST /predict``; it shares the CPU with the server.

1. latency at concurrency 1, p50/p99 (server with the default batching, --max-batch 16);
2. throughput at concurrency 16, batching on (--max-batch 16) and off (--max-batch 1);
3. load: ``--load-requests`` at concurrency 32, one in ``--bad-every`` requests a non-image,
   a truncated PNG or an over-limit upload, the model file replaced by a retrained one
   (different weights) half-way; counts 5xx other than deliberate 503s and the server's
   RSS at start, middle and end.

    python benchmarks/serve.py [--model RUN_DIR] [--threads 1] [--load-requests 20000]

Bars (issue 17): HTTP p50 <= 10 ms and p99 <= 25 ms at concurrency 1 (ORT fp32);
>= 250 images/s at concurrency 16; zero 5xx other than 503 in the load test; memory flat.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from _common import result, setup_logging, tree_rss
from PIL import Image

from fedlens.ops.procs import Procs, free_port, wait_for
from fedlens.shared.checkpoint import save_checkpoint
from fedlens.shared.config import load_config
from fedlens.shared.data import load_fashion_mnist
from fedlens.shared.data._sources import FASHION_MNIST_CLASSES
from fedlens.shared.inference import FP32_FILE, ExportOptions, export_model
from fedlens.shared.task import Task


def _default_model(folder: Path) -> Path:
    """The default config's model, as initialised, with Fashion-MNIST's classes."""
    cfg = load_config(None)
    task = Task(cfg, len(FASHION_MNIST_CLASSES))
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        folder / "model.safetensors", task.model.state_dict(), config=cfg.to_dict(), classes=list(FASHION_MNIST_CLASSES), round=0
    )
    return folder


def _other_weights(onnx_file: Path, out: Path) -> None:
    """A copy of the ONNX model with other classifier weights (a later round's model: same graph)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_file))
    changed = 0
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.ndim == 2 and arr.shape[0] == len(FASHION_MNIST_CLASSES):  # the classifier's weight
            shift = np.random.default_rng(1).normal(0, 0.01, arr.shape)  # a fresh head may be all zeros: scaling would not change it
            init.CopyFrom(numpy_helper.from_array((arr + shift).astype(arr.dtype), init.name))
            changed += 1
    if changed != 1:
        raise SystemExit(f"{onnx_file}: expected one classifier weight [10, C], found {changed}")
    tmp = out.with_suffix(".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, out)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class _Server:
    def __init__(self, procs: Procs, name: str, model: Path, threads: int, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        self.proc = procs.start(
            name, "serve", "--model", str(model), "--port", str(self.port), "--device", "cpu", "--threads", str(threads), *args
        )
        wait_for(lambda: self.proc.poll() is not None or _live(self.url), 180, f"{name} to answer", interval=0.2)
        if self.proc.poll() is not None:
            raise SystemExit(f"{name} exited: {procs.log(name)[-2000:]}")


def _live(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


failures: Counter[str] = Counter()  # client-side errors by type, over the whole benchmark


async def _run(url: str, bodies: list[tuple[str, bytes]], concurrency: int, on_done=None) -> tuple[list[float], Counter[int], float]:
    """Post every body (multipart file) with ``concurrency`` requests in flight; latencies, statuses, wall time."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            while True:
                try:
                    name, data = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t0 = time.perf_counter()
                try:
                    r = await client.post("/predict", files={"file": (name, data, "image/png")})
                    status = r.status_code
                except httpx.HTTPError as exc:
                    status = -1  # connection failure: counted as an error
                    failures[f"{type(exc).__name__} ({name}, after {sum(statuses.values())} answers): {exc}"[:160]] += 1
                latencies.append(time.perf_counter() - t0)
                statuses[status] += 1
                if on_done is not None:
                    on_done(sum(statuses.values()))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return latencies, statuses, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="a Fashion-MNIST run folder or model.safetensors (default: the default model as initialised)")
    p.add_argument("--work", type=Path, help="folder for the export (reused when it holds model.onnx)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="ONNX Runtime intra-op threads of the server (default 1: the event loop needs the other core)",
    )
    p.add_argument("--latency-requests", type=int, default=500)
    p.add_argument("--throughput-requests", type=int, default=3000)
    p.add_argument("--load-requests", type=int, default=20000)
    p.add_argument("--bad-every", type=int, default=10, help="one request in N is bad input in the load test (default 10)")
    args = p.parse_args()
    setup_logging()

    work = args.work or Path(tempfile.mkdtemp(prefix="fedlens-serve-bench-"))
    started = time.monotonic()
    if not (work / FP32_FILE).is_file():
        model = args.model or _default_model(work / "model")
        export_model(model, work, ExportOptions(eval_images=500, threads=args.threads))
    served = work / "serving" / FP32_FILE
    served.parent.mkdir(exist_ok=True)
    shutil.copyfile(work / FP32_FILE, served)
    _other_weights(work / FP32_FILE, work / "next-round.onnx")
    export_s = time.monotonic() - started

    _train, test = load_fashion_mnist()
    good = [(f"t{i}.png", _png(test.images[i, 0].numpy())) for i in range(64)]
    bad = [
        ("notes.png", b"this is not an image " * 20),
        ("cut.png", good[0][1][: len(good[0][1]) // 2]),
        ("big.png", os.urandom(int(1.2 * 1024 * 1024))),  # over the 1 MB limit below
    ]
    procs = Procs(work / "logs", {**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        batched = _Server(procs, "batched", served, args.threads, "--max-batch", "16", "--max-upload-mb", "1", "--max-queue", "256")
        warm = [good[i % len(good)] for i in range(100)]
        asyncio.run(_run(batched.url, warm, 4))
        lat, st, _ = asyncio.run(_run(batched.url, [good[i % len(good)] for i in range(args.latency_requests)], 1))
        assert set(st) == {200}, st
        ms = np.asarray(lat) * 1000
        p50, p99 = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
        print(f"latency at concurrency 1 ({args.latency_requests} requests): p50 {p50:.2f} ms, p99 {p99:.2f} ms", flush=True)

        bodies = [good[i % len(good)] for i in range(args.throughput_requests)]
        _, st_b, wall_b = asyncio.run(_run(batched.url, bodies, 16))
        thr_batched = st_b[200] / wall_b
        unbatched = _Server(procs, "unbatched", served, args.threads, "--max-batch", "1", "--max-queue", "256")
        asyncio.run(_run(unbatched.url, warm, 4))
        _, st_u, wall_u = asyncio.run(_run(unbatched.url, bodies, 16))
        thr_unbatched = st_u[200] / wall_u
        procs.stop("unbatched")
        print(
            f"throughput at concurrency 16: batched {thr_batched:.0f} img/s {dict(st_b)}, unbatched {thr_unbatched:.0f} img/s {dict(st_u)}",
            flush=True,
        )

        # The load test, on the batched server: bad input mixed in, a new model half-way.
        pid = batched.proc.pid
        rss = {"start": tree_rss(pid)}
        n = args.load_requests
        load = [
            bad[(i // args.bad_every) % len(bad)] if i % args.bad_every == args.bad_every - 1 else good[i % len(good)] for i in range(n)
        ]
        reloaded = {"at": None}

        def on_done(done: int) -> None:
            if done == n // 2 and reloaded["at"] is None:
                rss["middle"] = tree_rss(pid)
                os.replace(work / "next-round.onnx", served)  # the next round's model arrives
                reloaded["at"] = done

        v1 = httpx.get(f"{batched.url}/v2/models/fedlens").json()["versions"][0]
        _, st_l, wall_l = asyncio.run(_run(batched.url, load, 32, on_done))
        rss["end"] = tree_rss(pid)
        info = httpx.get(f"{batched.url}/v2/models/fedlens").json()
        v2 = info["versions"][0]
        five_xx = sum(c for s, c in st_l.items() if s >= 500 and s != 503) + st_l.get(-1, 0)
        print(
            f"load: {n} requests at concurrency 32 in {wall_l:.0f} s ({n / wall_l:.0f} req/s), statuses {dict(sorted(st_l.items()))}; "
            f"model {v1} -> {v2} (reloads {info['fedlens']['reloads']}); RSS MB start {rss['start'] / 1e6:.0f}, "
            f"middle {rss['middle'] / 1e6:.0f}, end {rss['end'] / 1e6:.0f}; client-side failures {dict(failures) or 'none'}",
            flush=True,
        )
    finally:
        procs.stop_all()
    result(
        http_p50_ms=p50,
        http_p99_ms=p99,
        throughput_batched=thr_batched,
        throughput_unbatched=thr_unbatched,
        load_requests=n,
        load_5xx=five_xx,
        load_503=st_l.get(503, 0),
        load_reloaded=int(v2 != v1),
        rss_start_mb=round(rss["start"] / 1e6, 1),
        rss_middle_mb=round(rss["middle"] / 1e6, 1),
        rss_end_mb=round(rss["end"] / 1e6, 1),
        threads=args.threads,
        setup_s=export_s,
    )


if __name__ == "__main__":
    main()
