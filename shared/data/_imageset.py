"""An in-memory labelled image set: the one data shape the core works on."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .scan import SkippedFile

__all__ = ["ImageSet", "LoadReport"]


@dataclass
class LoadReport:
    """What happened while reading an image folder: images read, files skipped and why."""

    source: str
    read: int = 0
    skipped_files: list[SkippedFile] = field(default_factory=list)
    multi_frame: int = 0  # files with several frames or pages, of which the first was used

    @property
    def skipped(self) -> int:
        return len(self.skipped_files)

    @property
    def errors(self) -> list[str]:
        """``"relative/path: reason"`` for the first 20 skipped files."""
        return [f"{_relative(s.path, self.source)}: {s.reason}" for s in self.skipped_files[:20]]

    def reasons(self) -> dict[str, int]:
        """Skipped files per reason category, most frequent first."""
        counts = Counter(s.category for s in self.skipped_files)
        return dict(counts.most_common())

    def summary(self) -> str:
        """One line: counts per reason, the first skipped file, and the multi-frame note."""
        text = f"{self.source}: {self.read} images read, {self.skipped} skipped"
        if self.skipped:
            text += " (" + ", ".join(f"{n} {reason}" for reason, n in self.reasons().items()) + f"; first: {self.errors[0]})"
        if self.multi_frame:
            text += f"; {self.multi_frame} multi-frame file(s) (DICOM, animated GIF, multi-page TIFF): the first frame of each is used"
        return text


def _relative(path: Path, root: str) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class ImageSet:
    """Images as ``uint8 [N, C, H, W]`` (C is 1 or 3) with ``int64 [N]`` labels.

    Arrays keep their stored size and channel count (folder images are stored at
    the image size they were decoded to); the resize policy, the grey-to-RGB
    expansion and normalisation happen per batch in the backbone's
    :class:`~shared.models.ImageTransform`, so a 28 x 28 grey set costs 28 x 28
    bytes an image in memory.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] not in (1, 3):
            raise ValueError(f"images must be uint8 [N, 1|3, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must be one integer per image")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: np.ndarray | torch.Tensor | list[int], name: str | None = None) -> ImageSet:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ImageSet(self.images[idx], self.labels[idx], self.classes, name or self.name)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def fingerprint(self) -> str:
        """A content hash: equal for equal images, labels and class names."""
        digest = hashlib.sha256()
        digest.update(repr((tuple(self.images.shape), self.classes)).encode())
        digest.update(self.images.contiguous().numpy().tobytes())
        digest.update(self.labels.numpy().tobytes())
        return digest.hexdigest()
