"""Model latency (batch 1, p50/p99) of PyTorch eager vs ONNX Runtime fp32 vs ORT INT8, and INT8 accuracy.

Exports the model with `fedlens export --int8` (calibration: 256 images of Fashion-MNIST's
public training split; checks: the 10,000 Fashion-MNIST test images), then times one
test image through each backend, the backends taking turns (five blocks each) so that
load from other jobs falls on all of them alike. Model only: the input is already decoded
and normalised.

    python benchmarks/inference.py --model RUN_DIR [--export DIR] [--threads 2] [--runs 500]

Bars (issue 17): INT8 accuracy drop <= 0.5 points on the 10,000 test images.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _common import result, setup_logging

from fedlens.shared.data import load_fashion_mnist
from fedlens.shared.inference import (
    EXPORT_FILE,
    FP32_FILE,
    INT8_FILE,
    ExportOptions,
    OnnxPredictor,
    TorchPredictor,
    export_model,
    load_model,
)

_CYCLES = 5


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ms = np.asarray(samples) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="run folder or model.safetensors (Fashion-MNIST classes)")
    p.add_argument("--export", type=Path, help="export folder: reused when it holds an export.json, else written")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of every backend (default 2)")
    p.add_argument("--runs", type=int, default=500, help="timed calls per backend (default 500)")
    p.add_argument("--warmup", type=int, default=50, help="untimed calls per backend (default 50)")
    args = p.parse_args()
    setup_logging()

    out = args.export or Path(tempfile.mkdtemp(prefix="fedlens-inference-bench-"))
    started = time.monotonic()
    if not (out / EXPORT_FILE).is_file():
        export_model(args.model, out, ExportOptions(int8=True, threads=args.threads))
    export_s = time.monotonic() - started
    record = json.loads((out / EXPORT_FILE).read_text())
    if not record.get("int8", {}).get("written"):
        raise SystemExit(f"{out} holds no INT8 model: {record.get('int8', {}).get('refused', 'export without --int8')}")

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    backends: dict[str, Callable[[torch.Tensor], np.ndarray]] = {
        "eager": TorchPredictor(loaded, fold=False).forward,  # the network as trained (adapters, BatchNorm)
        "eager_folded": TorchPredictor(loaded, fold=True).forward,
        "ort_fp32": OnnxPredictor(out / FP32_FILE, threads=args.threads).forward,
        "ort_int8": OnnxPredictor(out / INT8_FILE, threads=args.threads).forward,
    }
    _train, test = load_fashion_mnist()
    x = loaded.transform(test.images[:1])  # one decoded, normalised test image: model time only
    # Blocks of calls, the backends taking turns block by block: load from other jobs falls on
    # all of them alike, and one backend's idle worker threads (ONNX Runtime and OpenMP spin for
    # a while after a call) do not land in another backend's timed call.
    times: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(_CYCLES):
        for name, run in backends.items():
            for i in range(args.warmup // _CYCLES + args.runs // _CYCLES):
                t0 = time.perf_counter()
                run(x)
                if i >= args.warmup // _CYCLES:
                    times[name].append(time.perf_counter() - t0)

    lat = {name: _percentiles(samples) for name, samples in times.items()}
    size = loaded.transform.image_size
    print(f"model {args.model}: {record['model_card']['backbone']} @ {size} px, {args.threads} threads, batch 1, {args.runs} runs each")
    print(f"{'backend':<14} {'p50 ms':>8} {'p99 ms':>8}")
    for name, (p50, p99) in lat.items():
        print(f"{name:<14} {p50:>8.2f} {p99:>8.2f}")
    q, check = record["int8"], record["onnx"]["check_vs_torch"]
    print(
        f"INT8 on {q['images']} test images: accuracy {q['accuracy_int8']:.4f} vs {q['accuracy_fp32']:.4f} fp32 "
        f"(drop {q['drop_points']:.2f} points), agreement {q['top1_agreement_with_fp32']:.4f}; "
        f"fp32 vs PyTorch: max |logit diff| {check['max_abs_logit_diff']:.1e}, agreement {check['top1_agreement']:.4f}"
    )
    result(
        image_size=size,
        threads=args.threads,
        eager_p50_ms=lat["eager"][0],
        eager_p99_ms=lat["eager"][1],
        eager_folded_p50_ms=lat["eager_folded"][0],
        eager_folded_p99_ms=lat["eager_folded"][1],
        ort_fp32_p50_ms=lat["ort_fp32"][0],
        ort_fp32_p99_ms=lat["ort_fp32"][1],
        ort_int8_p50_ms=lat["ort_int8"][0],
        ort_int8_p99_ms=lat["ort_int8"][1],
        int8_vs_fp32_speedup=lat["ort_fp32"][0] / lat["ort_int8"][0],
        images=q["images"],
        accuracy_fp32=q["accuracy_fp32"],
        accuracy_int8=q["accuracy_int8"],
        int8_drop_points=q["drop_points"],
        int8_agreement=q["top1_agreement_with_fp32"],
        fp32_max_logit_diff=f"{check['max_abs_logit_diff']:.2e}",
        fp32_mb=round(record["onnx"]["bytes"] / 1e6, 2),
        int8_mb=round(q["bytes"] / 1e6, 2),
        export_s=export_s,
    )


if __name__ == "__main__":
    main()
