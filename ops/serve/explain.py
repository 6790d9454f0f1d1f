"""Explanations on request: one attribution overlay per image, off the batching path, one at a time.

The methods are the report's (:mod:`fedlens.shared.explain.methods`, Captum) and run on
the PyTorch model as trained, also when the service answers with an ONNX model (then
``--explain-model`` or the checkpoint named in the ONNX file's model card is loaded once).
Attribution costs tens of forward and backward passes, so only one explanation runs at a
time; a second one while it runs is refused (:class:`ExplainBusy`, a 503).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedlens.shared.errors import CheckpointError
from fedlens.shared.explain import get_method
from fedlens.shared.inference import LoadedModel, load_model

from .reload import ServedModel

if TYPE_CHECKING:
    from prometheus_client import Gauge

__all__ = ["ALIASES", "ExplainBusy", "ExplainUnavailable", "Explainer", "method_name"]

_log = logging.getLogger("fedlens.serve")

# Short names accepted in `?explain=` next to the registry's own names.
ALIASES = {"gradcam": "grad-cam", "ig": "integrated-gradients"}


class ExplainBusy(Exception):
    """Another explanation is running."""


class ExplainUnavailable(Exception):
    """No PyTorch model to explain with (an ONNX model without its checkpoint)."""


def method_name(text: str) -> str:
    """The registry name for ``?explain=`` (``gradcam``, ``ig``, or any registered name).

    Raises
    ------
    ValueError
        For an unknown method, listing the accepted names.
    """
    name = ALIASES.get(text, text)
    get_method(name)
    return name


class Explainer:
    """Runs attributions one at a time on a thread of its own.

    Parameters
    ----------
    checkpoint : path-like, optional
        The PyTorch checkpoint to explain with when the served model is ONNX.
    """

    def __init__(self, *, checkpoint: str | Path | None = None, running: Gauge | None = None) -> None:
        self._checkpoint = Path(checkpoint) if checkpoint else None
        self._running = running
        self._onnx_model: LoadedModel | None = None
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedlens-explain")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def explain(self, model: ServedModel, images: list[np.ndarray], targets: list[int], method: str) -> list[dict[str, Any]]:
        """One overlay per image (PNG data URL) for its target class.

        Raises
        ------
        ExplainBusy
            While another explanation runs.
        ExplainUnavailable
            When there is no PyTorch model to explain with.
        """
        if not self._lock.acquire(blocking=False):
            raise ExplainBusy("an explanation is already running; explanations run one at a time")
        if self._running is not None:
            self._running.inc()
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._run, model, images, targets, method)
        finally:
            self._lock.release()
            if self._running is not None:
                self._running.dec()

    def _torch_model(self, model: ServedModel) -> LoadedModel:
        if model.loaded is not None:
            return model.loaded
        if self._onnx_model is None:
            source = self._checkpoint or Path(str(model.predictor.card.get("file", "")))
            if not source.name or not source.exists():
                raise ExplainUnavailable(
                    "explanations need the PyTorch checkpoint of the served ONNX model; start `fedlens serve` with "
                    f"--explain-model MODEL (the model card names {str(source) or 'no file'}, which is not here)"
                )
            try:
                loaded = load_model(source)
            except CheckpointError as exc:
                raise ExplainUnavailable(f"--explain-model: {exc}") from exc
            if loaded.classes != model.predictor.classes:
                raise ExplainUnavailable(f"{source} has other classes than the served model; pass its own checkpoint with --explain-model")
            self._onnx_model = loaded
        return self._onnx_model

    def _run(self, model: ServedModel, images: list[np.ndarray], targets: list[int], method: str) -> list[dict[str, Any]]:
        from fedlens.shared.explain import attribute
        from fedlens.shared.explain.render import HEATMAP_CAVEAT, TRUST_CAVEAT, overlays
        from fedlens.shared.inference import stack_images

        loaded = self._torch_model(model)
        decoded = stack_images(images)
        x = loaded.transform(decoded)
        maps = attribute(method, loaded.model, x, torch.tensor(targets))
        info = get_method(method)
        rows = overlays(decoded, {method: maps})
        return [
            {
                "method": method,
                "title": info.title,
                "summary": info.summary,
                "class": model.predictor.classes[t],
                "overlay": row[method],
                "caveat": f"{HEATMAP_CAVEAT} {TRUST_CAVEAT}",
            }
            for row, t in zip(rows, targets)
        ]
