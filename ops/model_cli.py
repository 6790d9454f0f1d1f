"""``fedlens predict`` and ``fedlens export``: using a trained model."""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

from fedlens.shared.errors import FedlensError

__all__ = ["add_commands", "EXIT_SOME_UNREADABLE"]

_log = logging.getLogger("fedlens.predict")

# Exit status of `fedlens predict` when some inputs could not be read (the others were
# predicted and written); 0 when every input was predicted, 2 for errors that stop it.
EXIT_SOME_UNREADABLE = 1


def _format_table(rows: list[Any]) -> str:
    width = max([len(str(r.path)) for r in rows] + [4])
    lines = []
    for r in rows:
        if r.ok:
            answer = "  ".join(f"{label} {p:.3f}" for label, p in r.top)
        else:
            answer = f"UNREADABLE: {r.error}"
        lines.append(f"{str(r.path):<{width}}  {answer}")
    return "\n".join(lines) + ("\n" if lines else "")


def _format_csv(rows: list[Any], k: int) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "status", *[f"{c}_{i}" for i in range(1, k + 1) for c in ("label", "probability")], "error"])
    for r in rows:
        top = [v for label, p in r.top for v in (label, f"{p:.6f}")]
        top += [""] * (2 * k - len(top))
        writer.writerow([str(r.path), "ok" if r.ok else "error", *top, r.error or ""])
    return buf.getvalue()


def _format_json(rows: list[Any], k: int, predictor: Any) -> str:
    doc = {
        "model": {"backend": predictor.backend, "classes": list(predictor.classes), "card": predictor.card},
        "top_k": k,
        "results": [
            {"path": str(r.path), "top": [{"label": label, "probability": round(p, 6)} for label, p in r.top]}
            if r.ok
            else {"path": str(r.path), "error": r.error}
            for r in rows
        ],
        "unreadable": sum(not r.ok for r in rows),
    }
    return json.dumps(doc, indent=2) + "\n"


def _progress(total: int, enabled: bool) -> Any:
    """A progress bar on stderr, or ``None``: only on a terminal, and only for more than one batch."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr, leave=False, dynamic_ncols=True)


def _cmd_predict(args: argparse.Namespace) -> int:
    from fedlens.shared.inference import FileResult, expand_inputs, load_predictor, predict_files
    from fedlens.shared.io import atomic_write_text

    if args.top_k < 1:
        raise FedlensError("--top-k must be at least 1")
    found = expand_inputs(args.paths)
    if not found.files and not found.missing:
        raise FedlensError(f"no image files in {', '.join(map(str, args.paths))} (searched for: {_suffixes()})")
    predictor = load_predictor(args.model, device=args.device)
    k = min(args.top_k, len(predictor.classes))
    bar = _progress(len(found.files), enabled=sys.stderr.isatty() and len(found.files) > args.batch_size)
    try:
        rows = list(predict_files(predictor, found.files, k=k, batch_size=args.batch_size, progress=bar.update if bar else None))
    finally:
        if bar is not None:
            bar.close()
    rows += [FileResult(Path(path), [], reason) for path, reason in found.missing]
    text = {"table": lambda: _format_table(rows), "csv": lambda: _format_csv(rows, k), "json": lambda: _format_json(rows, k, predictor)}[
        args.format
    ]()
    if args.out:
        atomic_write_text(args.out, text)
    else:
        sys.stdout.write(text)
    failed = [r for r in rows if not r.ok]
    summary = f"{len(rows) - len(failed)} image(s) predicted with {predictor.backend}"
    if found.ignored:
        summary += f"; {found.ignored} file(s) in folders ignored (not an image file type)"
    if failed:
        summary += f"; {len(failed)} UNREADABLE (first: {failed[0].path}: {failed[0].error})"
    _log.info("%s%s", summary, f"; written to {args.out}" if args.out else "")
    return EXIT_SOME_UNREADABLE if failed else 0


def _suffixes() -> str:
    from fedlens.shared.data import IMAGE_SUFFIXES

    return " ".join(sorted(IMAGE_SUFFIXES))


def _cmd_export(args: argparse.Namespace) -> int:
    from fedlens.shared.inference import EXPORT_FILE, ExportOptions, export_model

    if args.calibration and not args.int8:
        raise FedlensError("--calibration only applies with --int8")
    if args.max_drop < 0:
        raise FedlensError(f"--max-drop is a number of accuracy points >= 0, got {args.max_drop}")
    options = ExportOptions(
        int8=args.int8,
        calibration=args.calibration,
        calibration_images=args.calibration_images,
        eval=args.eval,
        eval_images=args.eval_images,
        max_drop=args.max_drop,
    )
    record = export_model(args.model, args.out, options)
    onnx, check = record["onnx"], record["onnx"]["check_vs_torch"]
    print(
        f"{onnx['file']}: opset {onnx['opset']}, {onnx['bytes'] / 1e6:.1f} MB; vs PyTorch on {check['images']} images of "
        f"{record['eval']['source']}: max |logit difference| {check['max_abs_logit_diff']:.1e}, top-1 agreement {check['top1_agreement']:.4f}"
    )
    if "int8" in record:
        q = record["int8"]
        print(
            f"{q['file']}: {q['bytes'] / 1e6:.1f} MB; accuracy {q['accuracy_int8']:.4f} vs {q['accuracy_fp32']:.4f} fp32 "
            f"(drop {q['drop_points']:.2f} points, at most {q['max_drop_points']:g}), top-1 agreement {q['top1_agreement_with_fp32']:.4f}; "
            f"calibrated on {q['calibration']['images']} images of {q['calibration']['source']}"
        )
    card = record["model_card"]
    if card["private"] is None:
        privacy = "privacy unknown (no summary.json next to the model)"
    else:
        privacy = "private (DP-SGD at every site)" if card["private"] else f"NOT private: {card['privacy_reason']}"
    print(f"model card: {card['backbone']}, {len(card['classes'])} classes, {card['rounds']} rounds, {privacy}")
    print(f"written: {Path(args.out).resolve() / EXPORT_FILE}")
    return 0


def add_commands(sub: Any) -> None:
    """Register ``predict`` and ``export`` on the ``fedlens`` sub-command parser."""
    p = sub.add_parser(
        "predict",
        help="classify image files with a trained model (top-k labels and probabilities)",
        description="Classify images with a fedlens model. Files are decoded and resized exactly as in training "
        "(the model's own preprocessing). Unreadable files are listed with the reason and never stop the others.",
        epilog="Exit status: 0 every input was predicted; 1 some inputs could not be read (listed in the output; the "
        "others were predicted); 2 nothing could be done (bad model, no image files, bad arguments).",
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="MODEL_OR_RUN_DIR",
        help="model.safetensors, a run folder, a site's state folder (its global-model.safetensors), "
        "or a model.onnx / model.int8.onnx from `fedlens export` (runs in ONNX Runtime)",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="image files, folders (searched recursively for image files) or glob patterns (quote them; ** crosses folders)",
    )
    p.add_argument("--top-k", type=int, default=3, metavar="K", help="labels per image, most probable first (default 3)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format (default table)")
    p.add_argument("--out", type=Path, metavar="FILE", help="write the output to FILE (atomically) instead of stdout")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="where the model runs (default auto: CUDA if visible)")
    p.add_argument("--batch-size", type=int, default=64, help="images decoded and run together (default 64)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "export",
        help="export a model to ONNX (and ONNX Runtime static INT8), checked on real images",
        description="Fold the low-rank adapters and BatchNorm into plain convolutions and write model.onnx (opset 20), "
        "checked against the PyTorch model on labelled images (max |logit difference|, top-1 agreement). With --int8, "
        "also write model.int8.onnx (ONNX Runtime static quantization, QDQ, per-channel) only if its accuracy drop is "
        "within --max-drop points; otherwise refuse with the numbers (exit 2, no INT8 file). export.json records the "
        "checks, the calibration images and the model card (classes, backbone, rounds, each site's epsilon/delta).",
        epilog="Calibrating on a site's private images is a use of them outside the DP accounting: calibrate on public "
        "or server-held images (the default for a Fashion-MNIST model is Fashion-MNIST's public training split).",
    )
    p.add_argument("--model", required=True, metavar="MODEL_OR_RUN_DIR", help="model.safetensors, a run folder or a site's state folder")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for model.onnx, model.int8.onnx and export.json")
    p.add_argument("--int8", action="store_true", help="also write a static INT8 model, if it passes the accuracy check")
    p.add_argument(
        "--calibration",
        metavar="DIR|fashion-mnist",
        help="INT8 calibration images: a folder (any layout) of public or server-held images, or fashion-mnist (its "
        "public training split; the default for a Fashion-MNIST model)",
    )
    p.add_argument("--calibration-images", type=int, default=256, metavar="N", help="calibration images used (default 256)")
    p.add_argument(
        "--eval",
        metavar="DIR|fashion-mnist",
        help="labelled images for the checks: a folder with one sub-folder per model class, or fashion-mnist (its "
        "10,000 test images; the default for a Fashion-MNIST model)",
    )
    p.add_argument("--eval-images", type=int, default=0, metavar="N", help="check on at most N images, stratified (default 0: all)")
    p.add_argument(
        "--max-drop", type=float, default=0.5, metavar="POINTS", help="largest accepted INT8 accuracy drop in points (default 0.5)"
    )
    p.set_defaults(func=_cmd_export)
