"""A site folder with what a data check must find, written by the tests themselves."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from .hostile_files import truncated_jpeg


def write_check_folder(root: Path) -> Path:
    """``root`` with four class folders and what a data check must report.

    - ``Trouser``: 12 grey 24 px images, one of them also filed under ``bag`` (label noise);
    - ``bag``: 12 colour 48 px images, one stored twice (an exact duplicate), a text
      file and a truncated JPEG (both skipped);
    - ``belt``: 3 grey images (a tiny class);
    - ``shoe``: 4 grey images, a name the federation (trouser, bag, belt, sneaker) does not have.
    """
    rng = np.random.default_rng(0)
    for name, count, mode, size in (("Trouser", 12, "L", 24), ("bag", 12, "RGB", 48), ("belt", 3, "L", 24), ("shoe", 4, "L", 24)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).convert(mode).save(root / name / f"{name}_{i}.png")
    shutil.copy(root / "Trouser" / "Trouser_0.png", root / "bag" / "also_a_trouser.png")
    shutil.copy(root / "bag" / "bag_1.png", root / "bag" / "bag_1_copy.png")
    (root / "bag" / "notes.txt").write_text("scanner settings")
    truncated_jpeg(root / "bag" / "cut.jpg")
    return root
