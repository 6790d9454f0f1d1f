"""Tiny image folders cut from Fashion-MNIST: sample site data for trying a deployment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..config import FedConfig
from ._factory import load_dataset

__all__ = ["SAMPLE_CLASSES", "write_sample_folders"]

SAMPLE_CLASSES = ("trouser", "bag", "sneaker")  # three easy-to-tell classes
_SOURCE = {"trouser": 1, "bag": 8, "sneaker": 7}


def write_sample_folders(root: Path, names: list[str], *, per_class: int = 20, seed: int = 0) -> dict[str, Path]:
    """Write ``root/<name>/<class>/<i>.png`` for each name; disjoint images per folder.

    Parameters
    ----------
    root : Path
        Parent folder; one sub-folder per name is written.
    names : list of str
        One folder per name (a site, or the server's test set).
    per_class : int, default 20
        Images per class and folder.
    seed : int, default 0
        Which images go where.
    """
    train, _test = load_dataset(FedConfig.from_mapping({"max-train-images": 6000}))
    labels = train.labels.numpy()
    rng = np.random.default_rng(seed)
    pools = {c: rng.permutation(np.flatnonzero(labels == _SOURCE[c])) for c in SAMPLE_CLASSES}
    out = {}
    for k, name in enumerate(names):
        for c in SAMPLE_CLASSES:
            folder = root / name / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in pools[c][k * per_class : (k + 1) * per_class]:
                Image.fromarray(train.images[i, 0].numpy()).save(folder / f"{i}.png")
        out[name] = root / name
    return out
