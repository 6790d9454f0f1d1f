"""Outputs of a model's frozen prefix, computed once per image and cached on disk.

The frozen stages of a :class:`FedModel` never change during a run, so when no
augmentation applies their output for an image is a constant: computing it once
instead of every epoch is exact and removes most of the training cost.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path

import torch

from ..io import atomic_write_bytes
from ..models import FedModel, ImageTransform
from ._imageset import ImageSet

__all__ = ["compute_features", "cached_features", "default_cache_dir", "feature_cache_path"]

_log = logging.getLogger(f"fedlens.{__name__}")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fedlens`` (``~/.cache/fedlens``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fedlens"


@torch.no_grad()
def compute_features(
    model: FedModel,
    stop: int,
    images: ImageSet,
    transform: ImageTransform,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Run stages ``[:stop]`` of ``model`` over every image (eval mode, no augmentation).

    Parameters
    ----------
    model : FedModel
        The model whose frozen prefix runs.
    stop : int
        Stages ``[:stop]`` run (the fine-tune policy's cut).
    images : ImageSet
        Stored ``uint8`` images.
    transform : ImageTransform
        The backbone's preprocessing, applied per batch.
    """
    was_training = model.training
    model.eval()
    outputs = []
    started, last_log = time.monotonic(), time.monotonic()
    for start in range(0, len(images), batch_size):
        x = transform(images.images[start : start + batch_size]).to(device)
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        outputs.append(model.forward_until(x, stop).float().cpu())
        if time.monotonic() - last_log > 10:
            last_log = time.monotonic()
            _log.info("features for %s: %d/%d images", images.name, start + x.shape[0], len(images))
    model.train(was_training)
    _log.debug("features for %s: %d images in %.1fs", images.name, len(images), time.monotonic() - started)
    return torch.cat(outputs)


# Version 2: the key names the whole preprocessing (ImageTransform.key), not just the image size.
_KEY_VERSION = 2


def feature_cache_path(cache_dir: str | Path, *, model_id: str, stop: int, transform: ImageTransform, images: ImageSet) -> Path:
    """Where :func:`cached_features` keeps the features of ``images`` (the file may not exist yet).

    The key covers the frozen weights (``model_id``), the cut (``stop``), every step of
    the preprocessing (``transform.key``: resize policy and its version, image size,
    normalisation) and the images' content, so a change to any of them can never
    reuse stale features.
    """
    parts = [model_id, stop, transform.key, images.fingerprint(), _KEY_VERSION]
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]
    return Path(cache_dir) / "features" / f"{key}.pt"


def cached_features(
    model: FedModel,
    stop: int,
    images: ImageSet,
    transform: ImageTransform,
    *,
    model_id: str,
    cache_dir: str | Path | None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """:func:`compute_features`, read from / written to ``cache_dir`` when possible.

    Parameters
    ----------
    model_id : str
        Identifies the frozen weights (backbone, weights hash or seed): part of the key.
    cache_dir : path-like or None
        Cache folder; ``None`` disables the disk cache.
    """
    if cache_dir is None:
        return compute_features(model, stop, images, transform, device=device)
    path = feature_cache_path(cache_dir, model_id=model_id, stop=stop, transform=transform, images=images)
    if path.is_file():
        try:
            feats = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(feats, torch.Tensor) and feats.shape[0] == len(images):
                return feats
        except Exception as exc:  # a corrupt cache entry is recomputed, never trusted
            _log.warning("ignoring unreadable feature cache %s (%s)", path, exc)
    feats = compute_features(model, stop, images, transform, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(feats, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return feats
