"""Shared fixtures: small generated data sets, and Flower set to stay offline."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedlens.shared.protocol import FLOWER_ENV

for _key, _value in FLOWER_ENV.items():
    os.environ.setdefault(_key, _value)


def _pattern(cls: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """A class-dependent picture: a bright stripe whose position encodes the class."""
    img = rng.integers(0, 40, size=(size, size)).astype(np.uint8)
    band = size // 4
    start = (cls * band) % (size - band)
    img[start : start + band, :] = 220
    return img


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """An ImageFolder with 3 classes x 12 PNGs of mixed modes (grey, RGB, RGBA, palette, 16-bit)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    modes = ["L", "RGB", "RGBA", "P", "I;16"]
    for cls, name in enumerate(["alpha", "beta", "gamma"]):
        (root / name).mkdir(parents=True)
        for i in range(12):
            grey = _pattern(cls, rng, 24)
            mode = modes[i % len(modes)]
            if mode == "I;16":
                img = Image.fromarray(grey.astype(np.uint16) * 257)
            elif mode == "L":
                img = Image.fromarray(grey)
            else:
                img = Image.fromarray(np.stack([grey] * 3, axis=-1)).convert(mode)
            img.save(root / name / f"{name}_{i}.png")
    return root


@pytest.fixture
def cache_dir(tmp_path: Path) -> str:
    return str(tmp_path / "cache")
