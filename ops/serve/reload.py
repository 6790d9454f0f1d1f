"""The model being served, and its hot reload: watch the file, load a new one beside it, swap when valid.

A site's ``global-model.safetensors`` changes after every federated round. The watcher
polls the file (modification time and size every second, then a SHA-256 when either
moved), loads a changed file in its own thread, checks it (it loads, has the served
classes and image size, and a test forward pass gives finite probabilities) and only then
replaces the served model: one reference assignment, read by the inference worker at the
start of each batch, so a batch never mixes two models and no request fails. A file that
does not pass is logged and reported (``last_error``); the served model stays.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlens.shared.checkpoint import resolve_model_path
from fedlens.shared.errors import CheckpointError
from fedlens.shared.inference import LoadedModel, OnnxPredictor, Predictor, TorchPredictor, load_model

__all__ = ["ServedModel", "ModelWatcher", "load_served", "model_file", "file_version"]

_log = logging.getLogger("fedlens.serve")

# Characters of the SHA-256 shown as the model version (48 bits: collisions are not a concern).
VERSION_CHARS = 12


@dataclass(frozen=True)
class ServedModel:
    """One loaded model and where it came from.

    Attributes
    ----------
    predictor : Predictor
        What the inference worker runs.
    loaded : LoadedModel or None
        The PyTorch model as trained (for explanations); ``None`` when serving an ONNX file.
    file : Path
        The model file.
    version : str
        The first 12 hex digits of the file's SHA-256.
    loaded_at : str
        When it was loaded (ISO 8601, UTC).
    """

    predictor: Predictor
    loaded: LoadedModel | None
    file: Path
    version: str
    loaded_at: str

    @property
    def image_size(self) -> int:
        return self.predictor.transform.image_size


def model_file(source: str | Path) -> Path:
    """The file a ``--model`` argument names (a site's state folder, a run folder or a file)."""
    return resolve_model_path(source)


def file_version(path: Path) -> str:
    """The version of a model file: its SHA-256, first 12 hex digits."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:VERSION_CHARS]


def load_served(file: Path, *, runtime: str, device: str, threads: int | None) -> ServedModel:
    """Load ``file`` for serving and check it with a forward pass.

    Raises
    ------
    CheckpointError
        Not a fedlens model, or one whose test forward pass fails.
    """
    version = file_version(file)
    loaded: LoadedModel | None = None
    predictor: Predictor
    if runtime == "onnx":
        predictor = OnnxPredictor(file, threads=threads, device=device)
    else:
        loaded = load_model(file, device="cpu")
        predictor = TorchPredictor(loaded, device=device)
    _test_forward(predictor, file)
    return ServedModel(predictor, loaded, file, version, datetime.now(UTC).isoformat(timespec="seconds"))


def _test_forward(predictor: Predictor, file: Path) -> None:
    size = predictor.transform.image_size
    grey = torch.full((2, 1, size, size), 128, dtype=torch.uint8)
    grey[1] = 0
    try:
        probs = predictor.probabilities(grey)
    except Exception as exc:  # any failure of a foreign file's graph is a refusal, not a crash
        raise CheckpointError(f"{file}: the test forward pass failed ({type(exc).__name__}: {exc})") from exc
    if probs.shape != (2, len(predictor.classes)) or not np.isfinite(probs).all():
        raise CheckpointError(f"{file}: the test forward pass gave {probs.shape} probabilities, not finite [2, {len(predictor.classes)}]")


class ModelWatcher:
    """Holds the served model and replaces it when its file changes.

    Parameters
    ----------
    source : path-like
        The ``--model`` argument (resolved again at every poll: a state folder's file may
        appear under a new inode).
    load : callable
        ``Path -> ServedModel`` (:func:`load_served` with the service's settings).
    interval : float
        Seconds between polls.
    on_event : callable, optional
        Called with ``"reloaded"`` or ``"failed"`` after each attempt (metrics).
    """

    def __init__(
        self,
        source: str | Path,
        load: Callable[[Path], ServedModel],
        *,
        interval: float = 1.0,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.source = Path(source)
        self._load = load
        self.interval = interval
        self._on_event = on_event or (lambda _event: None)
        self.current: ServedModel = load(model_file(self.source))
        self.reloads = 0
        self.last_error: dict[str, Any] | None = None
        self._seen = self._fingerprint()
        self._failed_version: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedlens-model-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _fingerprint(self) -> tuple[str, int, int] | None:
        try:
            file = model_file(self.source)
            st = file.stat()
        except (CheckpointError, OSError):
            return None
        return (str(file), st.st_mtime_ns, st.st_size)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # the watcher must outlive any surprise; the served model is untouched
                _log.exception("model watcher: unexpected error (the served model is unchanged)")

    def poll(self) -> bool:
        """Check the file once; load, validate and swap if it changed. True when a new model is served."""
        seen = self._fingerprint()
        if seen is None or seen == self._seen:
            return False
        file = Path(seen[0])
        try:
            version = file_version(file)
        except OSError:
            return False  # replaced meanwhile: look again at the next poll
        if version in (self.current.version, self._failed_version):
            self._seen = seen
            return False
        try:
            candidate = self._load(file)
            self._check_compatible(candidate)
        except Exception as exc:
            if self._fingerprint() != seen:
                return False  # still being written: try the finished file at the next poll
            self._seen, self._failed_version = seen, version
            self.last_error = {
                "file": str(file),
                "version": version,
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
                "error": f"{type(exc).__name__}: {exc}",
            }
            _log.error("model %s (version %s) NOT loaded, still serving version %s: %s", file, version, self.current.version, exc)
            self._on_event("failed")
            return False
        if self._fingerprint() != seen:
            return False  # changed while loading: load the newer file at the next poll
        old, self.current = self.current, candidate  # the swap: the worker reads `current` once per batch
        self._seen, self.reloads, self.last_error = seen, self.reloads + 1, None
        _log.info("model reloaded from %s: version %s -> %s", file, old.version, candidate.version)
        self._on_event("reloaded")
        return True

    def _check_compatible(self, candidate: ServedModel) -> None:
        cur = self.current
        if candidate.predictor.classes != cur.predictor.classes:
            raise CheckpointError(
                f"its classes {list(candidate.predictor.classes)} differ from the served {list(cur.predictor.classes)}; "
                "a model for other classes needs a restart of the service"
            )
        if candidate.image_size != cur.image_size:
            raise CheckpointError(
                f"its image size {candidate.image_size} px differs from the served {cur.image_size} px; restart the service to change it"
            )
