"""Exporting a fedlens model to ONNX, and to ONNX Runtime static INT8 when it stays accurate.

The steps (:func:`export_model`):

1. load the checkpoint and fold its low-rank adapters and BatchNorms into plain
   convolutions (:func:`fold_for_inference`);
2. export the folded network with ``torch.onnx.export(dynamo=True)`` at opset
   :data:`OPSET`, batch size dynamic, input already normalised by the model's
   :class:`~shared.models.ImageTransform` (whose parameters the file carries);
3. check the ONNX model against the PyTorch model as trained on real images: largest
   absolute logit difference and top-1 agreement;
4. with ``int8``: ONNX Runtime static quantization (QDQ, per-channel int8 weights,
   uint8 activations, MinMax calibration; the first convolution kept in float),
   evaluated against the fp32 model on a
   labelled set. The INT8 file is written only if the accuracy drop is within
   ``max_drop`` points; otherwise :class:`ExportRefused` carries the numbers;
5. ``export.json``: the checks, the calibration images and the model card.

Calibration images are *used* by quantization (their activation ranges set the
scales). Calibrating on a site's private images is a use of them outside the DP
accounting, so the default is public data (Fashion-MNIST's training split) and any
folder given is recorded as such.
"""

from __future__ import annotations

import datetime
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import FASHION_MNIST_CLASSES, ImageSet, load_fashion_mnist, load_image_folder, stratified_cap
from ..errors import DataError, FedlensError
from ..io import atomic_write_bytes, atomic_write_json
from ..models import ImageDecodeError, sha256_of
from ._files import expand_inputs
from ._fold import fold_for_inference
from ._loading import LoadedModel, load_model
from ._predictor import ONNX_FORMAT, ONNX_INPUT, ONNX_META_KEY, ONNX_OUTPUT, OnnxPredictor, Predictor, stack_images

__all__ = ["ExportOptions", "ExportRefused", "export_model", "OPSET", "FASHION_MNIST", "EXPORT_FILE", "FP32_FILE", "INT8_FILE"]

_log = logging.getLogger(f"fedlens.{__name__}")

# Opset 20: what torch 2.14's exporter writes natively; ONNX Runtime 1.32 runs it and
# its QDQ quantizer handles it (per-channel QDQ needs 13 or later).
OPSET = 20
FASHION_MNIST = "fashion-mnist"
EXPORT_FILE, FP32_FILE, INT8_FILE = "export.json", "model.onnx", "model.int8.onnx"
# The fp32 export must reproduce the PyTorch logits up to float rounding (relative
# to the largest logit): a bigger difference means the graph is wrong, not rounded.
FP32_TOLERANCE = 1e-3
CALIBRATION_NOTE = (
    "Calibration sets the INT8 scales from these images' activations: it is a use of the images. "
    "Calibrating on a site's private images is a use of them outside the DP accounting of the training run; "
    "calibrate on public or server-held images."
)


class ExportRefused(FedlensError):
    """An export check failed; the message has the numbers, and no file of the refused model was left."""


@dataclass(frozen=True)
class ExportOptions:
    """What ``fedlens export`` writes and checks.

    Attributes
    ----------
    int8 : bool
        Also write a static INT8 model (if it passes the accuracy check).
    calibration : str, optional
        ``fashion-mnist`` (public: its training split) or a folder of images (any
        layout). Default: ``fashion-mnist`` for a Fashion-MNIST model; otherwise required.
    calibration_images : int
        At most this many calibration images (a stratified sample of Fashion-MNIST).
    eval : str, optional
        Labelled images for the checks: ``fashion-mnist`` (the 10,000 test images) or a
        folder with one sub-folder per model class. Default: ``fashion-mnist`` for a
        Fashion-MNIST model; otherwise required.
    eval_images : int
        Check on at most this many images (stratified; 0 = all).
    max_drop : float
        Largest accepted INT8 accuracy drop, in percentage points.
    threads : int, optional
        ONNX Runtime threads for the checks.
    """

    int8: bool = False
    calibration: str | None = None
    calibration_images: int = 256
    eval: str | None = None
    eval_images: int = 0
    max_drop: float = 0.5
    threads: int | None = None


def _is_fashion_mnist(loaded: LoadedModel) -> bool:
    return tuple(loaded.classes) == FASHION_MNIST_CLASSES


def _eval_set(spec: str, loaded: LoadedModel, cap: int) -> tuple[ImageSet, str]:
    if spec == FASHION_MNIST:
        if not _is_fashion_mnist(loaded):
            raise DataError(f"the model's classes ({', '.join(loaded.classes)}) are not Fashion-MNIST's: pass --eval DIR")
        _train, images = load_fashion_mnist()
        source = "Fashion-MNIST test split"
    else:
        images, report = load_image_folder(spec, transform=loaded.transform)
        if report.skipped:
            _log.warning("%s", report.summary())
        if list(images.classes) != list(loaded.classes):
            raise DataError(
                f"the class folders of {spec} ({', '.join(images.classes)}) are not the model's classes ({', '.join(loaded.classes)}); "
                "the checks need one sub-folder per model class, named the same"
            )
        source = f"image folder {spec}"
    if cap:
        images = images.subset(stratified_cap(images.labels.numpy(), cap, seed=0))
    return images, source


def _calibration_set(spec: str, loaded: LoadedModel, cap: int) -> tuple[torch.Tensor, dict[str, Any]]:
    if spec == FASHION_MNIST:
        train, _test = load_fashion_mnist()
        keep = stratified_cap(train.labels.numpy(), cap, seed=0)
        record = {"source": "fashion-mnist", "kind": "public data set (Fashion-MNIST training split, stratified sample)"}
        return train.images[keep], {**record, "images": len(keep)}
    found = expand_inputs([spec])
    if not found.files:
        raise DataError(f"calibration folder {spec} holds no image files")
    arrays = []
    for path in found.files[:cap]:
        try:
            arrays.append(loaded.transform.decode(path))
        except ImageDecodeError as exc:
            _log.warning("calibration: skipping %s: %s", path, exc)
    if not arrays:
        raise DataError(f"calibration folder {spec}: none of its files could be decoded")
    record = {"source": str(spec), "kind": "folder given by the operator (public or server-held images, as the operator states)"}
    return stack_images(arrays), {**record, "images": len(arrays)}


def _logits(predictor: Predictor, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    return np.concatenate([predictor.logits(images[i : i + batch]) for i in range(0, len(images), batch)])


def _onnx_metadata(loaded: LoadedModel, precision: str) -> str:
    p = loaded.transform.preprocessing
    return json.dumps(
        {
            "format": ONNX_FORMAT,
            "precision": precision,
            "preprocessing": {
                "image_size": loaded.transform.image_size,
                "input_size": p.input_size,
                "mean": list(p.mean),
                "std": list(p.std),
                "resize": loaded.transform.key,
            },
            "card": loaded.card,
        },
        sort_keys=True,
    )


def _write_onnx(proto: Any, path: Path, metadata: str) -> None:
    """Write an ONNX ``ModelProto`` with the fedlens metadata, atomically."""
    props = proto.metadata_props
    for i in reversed(range(len(props))):
        if props[i].key == ONNX_META_KEY:
            del props[i]
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_META_KEY, metadata
    atomic_write_bytes(path, proto.SerializeToString())


def _export_fp32(net: torch.nn.Module, image_size: int, path: Path, metadata: str) -> None:
    from torch.export import Dim

    example = torch.zeros(2, 3, image_size, image_size)
    program = torch.onnx.export(
        net,
        (example,),
        dynamo=True,
        opset_version=OPSET,
        input_names=[ONNX_INPUT],
        output_names=[ONNX_OUTPUT],
        dynamic_shapes=({0: Dim("batch")},),
        verbose=False,
    )
    if program is None:
        raise FedlensError("torch.onnx.export returned no program")
    _write_onnx(program.model_proto, path, metadata)


class _Calibration:
    """ONNX Runtime's CalibrationDataReader over normalised batches."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self._it = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {ONNX_INPUT: batch}


def _quantize(fp32: Path, out: Path, calibration: torch.Tensor, transform: Any, metadata: str) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    batches = [transform(calibration[i : i + 32]).numpy() for i in range(0, len(calibration), 32)]
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".int8-") as tmp:
        pre, q = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32), str(pre))
        # The first convolution (the one that reads the image) stays in float: on the
        # default model it carries a measurable share of the INT8 error (top-1 agreement
        # with fp32 0.955 -> 0.964 on 2,000 test images) and no measurable share of the time.
        first_conv = [next(n.name for n in onnx.load(str(pre)).graph.node if n.op_type == "Conv")]
        quantize_static(
            str(pre),
            str(q),
            _Calibration(batches),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=first_conv,
            # No CalibMaxIntermediateOutputs: in ONNX Runtime 1.32 it drops the buffered
            # batches without reducing them (onnxruntime#18893), and the MinMax calibrator
            # keeps only per-tensor minima and maxima per batch anyway.
        )
        _write_onnx(onnx.load(str(q)), out, metadata)


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def _file_record(path: Path) -> dict[str, Any]:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_of(path)}


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def export_model(model: str | Path, out: str | Path, options: ExportOptions | None = None) -> dict[str, Any]:
    """Fold, export and check a fedlens model; write ``model.onnx`` (and ``model.int8.onnx``) and ``export.json``.

    Parameters
    ----------
    model : path-like
        A checkpoint, run folder or site state folder (see :func:`load_model`).
    out : path-like
        Folder for the files (created). A ``model.int8.onnx`` there from an earlier
        export is removed unless this export writes a new one, so the folder never
        holds files of two different models.
    options : ExportOptions, optional
        INT8, calibration and evaluation images, accepted accuracy drop.

    Returns
    -------
    dict
        What ``export.json`` holds.

    Raises
    ------
    ExportRefused
        When the fp32 model does not reproduce the PyTorch logits (nothing written), or
        the INT8 accuracy drop exceeds ``max_drop`` (``model.onnx`` and ``export.json``
        are written, with the refusal recorded; no INT8 file).
    DataError
        When the evaluation or calibration images are missing, unreadable, or not
        labelled with the model's classes.
    """
    o = options or ExportOptions()
    if o.max_drop < 0:
        raise ValueError(f"max_drop must be >= 0 points, got {o.max_drop}")
    out = Path(out)
    loaded = load_model(model)
    eval_spec = o.eval or (FASHION_MNIST if _is_fashion_mnist(loaded) else None)
    calib_spec = o.calibration or (FASHION_MNIST if _is_fashion_mnist(loaded) else None)
    if eval_spec is None:
        raise DataError(
            "the export is checked on real labelled images: pass --eval DIR (one sub-folder per model class: "
            f"{', '.join(loaded.classes[:4])}{', ...' if len(loaded.classes) > 4 else ''})"
        )
    if o.int8 and calib_spec is None:
        raise DataError(f"--int8 needs calibration images: pass --calibration DIR with public or server-held images. {CALIBRATION_NOTE}")
    images, eval_source = _eval_set(eval_spec, loaded, o.eval_images)
    if len(images) == 0:
        raise DataError(f"{eval_source} holds no images")
    calibration, calib_record = _calibration_set(calib_spec, loaded, o.calibration_images) if o.int8 and calib_spec else (None, None)

    out.mkdir(parents=True, exist_ok=True)
    fold = fold_for_inference(loaded.model)
    labels = images.labels.numpy()
    # The PyTorch model as trained, through the path the run evaluated with (which reuses the
    # run's cached frozen-part features when they are there).
    reference = loaded.task.predict(loaded.task.prepare(images, for_training=False)).numpy()
    record: dict[str, Any] = {
        "format": "fedlens-export-v1",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source": {"model": str(loaded.path), "sha256": sha256_of(loaded.path), "round": loaded.meta.get("round")},
        "model_card": loaded.card,
        "preprocessing": json.loads(_onnx_metadata(loaded, "fp32"))["preprocessing"],
        "input": f"float32 [batch, 3, {loaded.transform.image_size}, {loaded.transform.image_size}], normalised as in preprocessing",
        "output": f"float32 [batch, {len(loaded.classes)}] logits in the order of model_card.classes",
        "fold": fold.to_dict(),
        "eval": {"source": eval_source, "images": len(images), "accuracy_torch": _accuracy(reference, labels)},
        "versions": _versions(),
    }

    fp32_path = out / FP32_FILE
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        candidate = Path(tmp) / FP32_FILE
        _export_fp32(fold.model, loaded.transform.image_size, candidate, _onnx_metadata(loaded, "fp32"))
        fp32_logits = _logits(OnnxPredictor(candidate, threads=o.threads), images.images)
        diff = float(np.abs(fp32_logits - reference).max())
        check = {
            "images": len(images),
            "max_abs_logit_diff": diff,
            "top1_agreement": float((fp32_logits.argmax(1) == reference.argmax(1)).mean()),
            "accuracy": _accuracy(fp32_logits, labels),
            "tolerance": FP32_TOLERANCE * max(1.0, float(np.abs(reference).max())),
        }
        if diff > check["tolerance"]:
            raise ExportRefused(
                f"the ONNX model does not reproduce the PyTorch model: max |logit difference| {diff:.2e} on {len(images)} images "
                f"(tolerance {check['tolerance']:.1e}, top-1 agreement {check['top1_agreement']:.4f}); nothing was written"
            )
        candidate.replace(fp32_path)
    record["onnx"] = {**_file_record(fp32_path), "opset": OPSET, "exporter": "torch.onnx.export(dynamo=True)", "check_vs_torch": check}
    _log.info("%s: max |logit diff| vs PyTorch %.2e, top-1 agreement %.4f", fp32_path, diff, check["top1_agreement"])

    int8_path = out / INT8_FILE
    refusal = None
    if calibration is not None:
        record["int8"], refusal = _int8(loaded, fp32_path, int8_path, calibration, calib_record, images, fp32_logits, o)
    if (calibration is None or refusal) and int8_path.is_file():
        _log.info("removing %s: it is from an earlier export, not of this model.onnx", int8_path)
        int8_path.unlink()
    atomic_write_json(out / EXPORT_FILE, record)
    if refusal:
        raise ExportRefused(refusal)
    return record


def _int8(
    loaded: LoadedModel,
    fp32_path: Path,
    int8_path: Path,
    calibration: torch.Tensor,
    calib_record: dict[str, Any] | None,
    images: ImageSet,
    fp32_logits: np.ndarray,
    o: ExportOptions,
) -> tuple[dict[str, Any], str | None]:
    """Quantize, evaluate, and keep the INT8 file only within ``max_drop``; ``(record, refusal or None)``."""
    labels = images.labels.numpy()
    with tempfile.TemporaryDirectory(dir=int8_path.parent, prefix=".int8-") as tmp:
        candidate = Path(tmp) / INT8_FILE
        _quantize(fp32_path, candidate, calibration, loaded.transform, _onnx_metadata(loaded, "int8"))
        int8_logits = _logits(OnnxPredictor(candidate, threads=o.threads), images.images)
        acc32, acc8 = _accuracy(fp32_logits, labels), _accuracy(int8_logits, labels)
        drop = round((acc32 - acc8) * 100, 4)
        record: dict[str, Any] = {
            "method": "ONNX Runtime static quantization: QDQ, per-channel int8 weights, uint8 activations, MinMax calibration; "
            "the first convolution kept in float",
            "calibration": {**(calib_record or {}), "note": CALIBRATION_NOTE},
            "images": len(images),
            "accuracy_fp32": acc32,
            "accuracy_int8": acc8,
            "drop_points": drop,
            "max_drop_points": o.max_drop,
            "top1_agreement_with_fp32": float((int8_logits.argmax(1) == fp32_logits.argmax(1)).mean()),
        }
        if drop > o.max_drop:
            record.update(written=False, refused=f"accuracy drop {drop:.2f} points > --max-drop {o.max_drop:g}")
            message = (
                f"INT8 model refused: accuracy {acc8:.4f} vs {acc32:.4f} fp32 on {len(images)} images of {images.name}, "
                f"a drop of {drop:.2f} points > --max-drop {o.max_drop:g} (top-1 agreement {record['top1_agreement_with_fp32']:.4f}). "
                f"No INT8 file was written; {FP32_FILE} and {EXPORT_FILE} were."
            )
            _log.warning("%s", message)
            return record, message
        candidate.replace(int8_path)
    record.update(written=True, **_file_record(int8_path))
    _log.info("%s: accuracy %.4f vs %.4f fp32 (drop %.2f points)", int8_path, acc8, acc32, drop)
    return record, None
