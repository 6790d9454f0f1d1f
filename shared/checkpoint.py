"""Model checkpoints as safetensors with the run's config embedded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .errors import CheckpointError
from .io import atomic_write_bytes

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_meta",
    "resolve_model_path",
    "Checkpoint",
    "MODEL_FILE",
    "GLOBAL_MODEL_FILE",
]

_FORMAT = "fedlens-model-v1"
# A run folder's global model, and the copy a deployed site keeps in its state folder.
MODEL_FILE = "model.safetensors"
GLOBAL_MODEL_FILE = "global-model.safetensors"
# Tensors under this prefix are the server's training state (the plain aggregate when the
# published model is an average over rounds), kept apart from the model's own state.
_TRAINING = "training/"


class Checkpoint(dict):
    """``state`` (tensors) plus ``meta`` (the JSON metadata written with them)."""

    @property
    def state(self) -> dict[str, torch.Tensor]:
        return self["state"]

    @property
    def meta(self) -> dict[str, Any]:
        return self["meta"]

    @property
    def training_state(self) -> dict[str, torch.Tensor] | None:
        """The server's training state saved with the model, if any (see ``save_checkpoint``)."""
        return self.get("training")


def save_checkpoint(
    path: str | Path, state: dict[str, torch.Tensor], *, training_state: dict[str, torch.Tensor] | None = None, **meta: Any
) -> None:
    """Write ``state`` and JSON-serialisable ``meta`` atomically as safetensors.

    ``meta`` should carry at least ``config`` (the resolved run config mapping),
    ``classes`` and ``round``. ``training_state`` (optional) is stored in the same
    file, so that the model and what training resumes from can never disagree.
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    for k, v in (training_state or {}).items():
        tensors[_TRAINING + k] = v.detach().cpu().contiguous()
    header = {"format": _FORMAT, **{k: json.dumps(v) for k, v in meta.items()}}
    atomic_write_bytes(path, save(tensors, metadata=header))


def resolve_model_path(path: str | Path) -> Path:
    """The model file ``path`` names: itself, a run folder's ``model.safetensors``, or a
    site state folder's ``global-model.safetensors``.

    Raises
    ------
    CheckpointError
        If there is no such file.
    """
    path = Path(path)
    if path.is_dir():
        for name in (MODEL_FILE, GLOBAL_MODEL_FILE):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(
            f"{path} holds no {MODEL_FILE} (a run folder) and no {GLOBAL_MODEL_FILE} (a site's state folder); pass the model file itself"
        )
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist")
    return path


def _read(path: str | Path, *, tensors: bool) -> Checkpoint:
    path = resolve_model_path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()} if tensors else {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a safetensors model ({exc}). fedlens only loads safetensors files, "
            "because pickled checkpoints can run arbitrary code when opened."
        ) from exc
    if header.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a fedlens model (no '{_FORMAT}' header)")
    meta = {k: json.loads(v) for k, v in header.items() if k != "format"}
    training = {k[len(_TRAINING) :]: v for k, v in state.items() if k.startswith(_TRAINING)}
    model = {k: v for k, v in state.items() if not k.startswith(_TRAINING)}
    return Checkpoint(state=model, meta=meta, **({"training": training} if training else {}))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (a file, a run folder or a site state folder).

    Only safetensors are read: other formats could execute code when unpickled.

    Raises
    ------
    CheckpointError
        If the file is missing, not safetensors, or not a fedlens model.
    """
    return _read(path, tensors=True)


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """Only the metadata of a checkpoint (no tensors are read); errors as :func:`load_checkpoint`."""
    return _read(path, tensors=False).meta
