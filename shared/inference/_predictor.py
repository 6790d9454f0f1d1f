"""One interface over the ways fedlens runs a model: PyTorch, ONNX Runtime fp32 and INT8.

A :class:`Predictor` takes a batch of decoded images (``uint8 [B, 1|3, H, W]``, as
:meth:`ImageTransform.decode` returns them) and returns class probabilities. It
applies the model's own :class:`~shared.models.ImageTransform` first, so every
backend sees exactly the input training saw. ``fedlens predict`` and the HTTP service
sit on it; :func:`load_predictor` picks the backend from the file.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError
from ..models import ImageTransform, Preprocessing

if TYPE_CHECKING:
    from torch import nn

    from ._loading import LoadedModel

__all__ = [
    "Predictor",
    "TorchPredictor",
    "OnnxPredictor",
    "load_predictor",
    "read_onnx_metadata",
    "stack_images",
    "top_k",
    "ONNX_META_KEY",
]

_log = logging.getLogger(f"fedlens.{__name__}")

# The ONNX metadata entry that makes an exported file self-describing (classes,
# preprocessing, model card): written by `export_model`, read by `OnnxPredictor`.
ONNX_META_KEY = "fedlens"
ONNX_FORMAT = "fedlens-onnx-v1"
ONNX_INPUT, ONNX_OUTPUT = "images", "logits"


def stack_images(images: Sequence[np.ndarray]) -> torch.Tensor:
    """Stack decoded images (``uint8 [C, S, S]``, C = 1 or 3) into one batch.

    Grey images are repeated to three channels when the batch mixes grey and colour
    (the transform would do the same), so one batch can hold both.

    Raises
    ------
    ValueError
        If the images differ in size (decode them with the same transform).
    """
    if not images:
        raise ValueError("no images to stack")
    channels = max(a.shape[0] for a in images)
    if len({a.shape[1:] for a in images}) > 1:
        raise ValueError(f"images of different sizes cannot form a batch: {sorted({a.shape[1:] for a in images})}")
    return torch.from_numpy(np.stack([np.repeat(a, channels // a.shape[0], axis=0) for a in images]))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def top_k(probabilities: np.ndarray, classes: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """The ``k`` most probable ``(class, probability)`` pairs of each row, most probable first."""
    k = max(1, min(k, probabilities.shape[1]))
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [[(classes[j], float(row[j])) for j in idx] for row, idx in zip(probabilities, order)]


class Predictor(ABC):
    """A model behind one call: decoded images in, class probabilities out.

    Attributes
    ----------
    classes : tuple of str
        Class names in the order of the outputs.
    transform : ImageTransform
        The model's preprocessing; :meth:`decode` reads files with it.
    card : dict
        The model card (classes, backbone, rounds, sites and their privacy).
    backend : str
        ``torch``, ``onnxruntime-fp32`` or ``onnxruntime-int8``.
    """

    classes: tuple[str, ...]
    transform: ImageTransform
    card: dict[str, Any]
    backend: str

    def decode(self, path: str | Path) -> np.ndarray:
        """Read one image file as the model's decoded input (see :meth:`ImageTransform.decode`)."""
        return self.transform.decode(path)

    @abstractmethod
    def forward(self, x: torch.Tensor) -> np.ndarray:
        """Logits ``float32 [B, K]`` for inputs the transform already prepared (``float [B, 3, S, S]``, normalised)."""

    def logits(self, images: torch.Tensor) -> np.ndarray:
        """Logits ``float32 [B, K]`` for decoded images ``uint8 [B, 1|3, H, W]``."""
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise TypeError(f"a Predictor takes decoded images uint8 [B, 1|3, H, W], got {images.dtype} {tuple(images.shape)}")
        if images.shape[0] == 0:
            return np.empty((0, len(self.classes)), dtype=np.float32)
        return self.forward(self.transform(images))

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """Class probabilities ``float32 [B, K]`` (softmax of :meth:`logits`)."""
        return _softmax(self.logits(images).astype(np.float64)).astype(np.float32)


class TorchPredictor(Predictor):
    """The PyTorch model, folded (adapters and BatchNorm in the convolutions) unless asked not to.

    Parameters
    ----------
    loaded : LoadedModel
        From :func:`load_model`.
    device : str
        ``cpu``, ``cuda`` or ``auto``.
    fold : bool
        Run the folded copy (:func:`fold_for_inference`; same outputs up to float
        rounding, fewer operations) rather than the network as trained.
    """

    def __init__(self, loaded: LoadedModel, *, device: str = "cpu", fold: bool = True) -> None:
        from ..task import resolve_device
        from ._fold import fold_for_inference

        self.device = resolve_device(device)
        net: nn.Module = fold_for_inference(loaded.model).model if fold else loaded.model
        self.model = net.to(self.device).eval()
        if self.device.type == "cpu":
            # Depthwise convolutions run ~1.5x faster channels-last on CPU (as in training).
            self.model.to(memory_format=torch.channels_last)
        self.classes = loaded.classes
        self.transform = loaded.transform
        self.card = loaded.card
        self.backend = "torch"

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> np.ndarray:
        x = x.to(self.device)
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).float().cpu().numpy()


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The fedlens metadata of an exported ONNX file (classes, preprocessing, card).

    Raises
    ------
    CheckpointError
        If the file cannot be read or was not exported by fedlens.
    """
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ValueError...
        raise CheckpointError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    props = {p.key: p.value for p in model.metadata_props}
    if ONNX_META_KEY not in props:
        raise CheckpointError(f"{path} is an ONNX model but was not exported by `fedlens export` (no '{ONNX_META_KEY}' metadata)")
    meta = dict(json.loads(props[ONNX_META_KEY]))
    if meta.get("format") != ONNX_FORMAT:
        raise CheckpointError(f"{path}: unknown fedlens ONNX format {meta.get('format')!r} (expected {ONNX_FORMAT})")
    return meta


class OnnxPredictor(Predictor):
    """An exported ONNX model (fp32 or INT8) in ONNX Runtime.

    Classes, preprocessing and model card come from the file's fedlens metadata, so
    the file alone is enough.

    Parameters
    ----------
    path : path-like
        A ``model.onnx`` or ``model.int8.onnx`` written by ``fedlens export``.
    threads : int, optional
        ONNX Runtime's intra-op threads (default: its own choice, one per core).
    device : str
        ``cpu``, ``cuda`` (needs the onnxruntime-gpu build) or ``auto``.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None, device: str = "cpu") -> None:
        import onnxruntime as ort

        meta = read_onnx_metadata(path)
        providers = ["CPUExecutionProvider"]
        available = ort.get_available_providers()
        if device in ("cuda", "auto") and "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        elif device == "cuda":
            raise ConfigError(
                f"--device cuda with an ONNX model needs the onnxruntime-gpu build (providers here: {', '.join(available)}); "
                "use --device cpu, or the PyTorch checkpoint"
            )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        pre = meta["preprocessing"]
        self.transform = ImageTransform(
            image_size=pre["image_size"], preprocessing=Preprocessing(pre["input_size"], tuple(pre["mean"]), tuple(pre["std"]))
        )
        self.classes = tuple(meta["card"]["classes"])
        self.card = meta["card"]
        self.backend = f"onnxruntime-{meta['precision']}"
        self.path = Path(path)

    def forward(self, x: torch.Tensor) -> np.ndarray:
        (out,) = self.session.run([ONNX_OUTPUT], {ONNX_INPUT: x.numpy().astype(np.float32, copy=False)})
        return np.asarray(out, dtype=np.float32)


def load_predictor(path: str | Path, *, device: str = "auto", threads: int | None = None) -> Predictor:
    """A :class:`Predictor` for a checkpoint, run folder, site state folder or exported ``.onnx`` file.

    Parameters
    ----------
    path : path-like
        A ``.onnx`` file exported by ``fedlens export`` runs in ONNX Runtime; anything
        else is read as a fedlens checkpoint (:func:`load_model`) and runs folded in PyTorch.
    device : str
        ``cpu``, ``cuda`` or ``auto`` (CUDA when available).
    threads : int, optional
        ONNX Runtime intra-op threads (PyTorch uses ``torch.set_num_threads``).

    Raises
    ------
    CheckpointError
        When the file is not a fedlens model.
    """
    from ._loading import load_model

    if Path(path).suffix.lower() == ".onnx":
        return OnnxPredictor(path, threads=threads, device=device)
    return TorchPredictor(load_model(path, device="cpu"), device=device)
