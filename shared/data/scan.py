"""What is in an image folder, file by file, without loading it into memory.

:func:`scan_folder` walks the same ``root/<class>/...`` layout as
:func:`~fedlens.shared.data.load_image_folder`, and decides about every file with
the same function, so the two always agree on which files are used and which are
skipped, and why. For each usable file it records its header facts and the SHA-256
of its bytes (exact duplicates). It also decodes each file, at the smallest scale
the format allows, because only decoding proves a file usable (a truncated JPEG has
a perfect header): a 50-megapixel JPEG costs about a megabyte, other formats and
DICOM their stored size once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..models import Decoded, ImageDecodeError, file_kind, read_image, sha256_of

__all__ = ["FolderScan", "ImageFacts", "SkippedFile", "scan_folder"]

_log = logging.getLogger(__name__)

# The scan decodes at this size only to prove the file decodes (JPEGs at 1/8 scale).
_PROBE_SIZE = 8


@dataclass(frozen=True)
class ImageFacts:
    """One usable file: where it is filed and what its header says.

    ``width`` and ``height`` are the stored size (before any reduction or EXIF
    rotation); ``mode`` is PIL's mode (``"L"``, ``"RGB"``, ``"I;16"``, ``"P"``) or
    ``"DICOM <photometric interpretation>"``; ``frames`` counts the frames or pages
    of a multi-frame file (only the first is used).
    """

    path: Path
    label_dir: str
    width: int
    height: int
    mode: str
    bit_depth: int
    frames: int
    sha256: str


@dataclass(frozen=True)
class SkippedFile:
    """A file that is not used, and why.

    ``reason`` reads ``"category: detail"``; the categories are ``empty file``, ``not an
    image``, ``decompression bomb``, ``truncated``, ``damaged`` and ``unsupported``.
    It never quotes a value from inside the file (no patient data from DICOM).
    """

    path: Path
    reason: str

    @property
    def category(self) -> str:
        """The reason's first part, for counting files per reason."""
        return self.reason.split(":", 1)[0]


@dataclass(frozen=True)
class FolderScan:
    """Every file under ``root``'s class folders: the usable ones and the skipped ones."""

    root: Path
    images: tuple[ImageFacts, ...]
    skipped: tuple[SkippedFile, ...]


def scan_folder(root: str | Path, *, max_pixels: int) -> FolderScan:
    """Scan an ImageFolder layout (``root/<class>/<file>``, DICOM files included).

    Parameters
    ----------
    root : path-like
        The folder holding one sub-folder per class.
    max_pixels : int
        The site's ``max-image-pixels`` (``FedConfig.max_image_pixels``): larger frames
        are skipped as decompression bombs, exactly as the loader skips them.

    Returns
    -------
    FolderScan
        Usable files in class-folder order (classes sorted by name, files by path)
        with their facts, and the skipped files with their reasons.

    Raises
    ------
    DataError
        If ``root`` is missing or has no class sub-folders.
    """
    root = Path(root)
    images: list[ImageFacts] = []
    skipped: list[SkippedFile] = []
    read = functools.partial(read_image, size=_PROBE_SIZE, max_pixels=max_pixels)
    for label_dir, path in walk_folder(root):
        result = read_file(path, read)
        if isinstance(result, SkippedFile):
            skipped.append(result)
            continue
        info = result.info
        images.append(
            ImageFacts(
                path=path,
                label_dir=label_dir,
                width=info.width,
                height=info.height,
                mode=info.mode,
                bit_depth=info.bit_depth,
                frames=info.frames,
                sha256=sha256_of(path),
            )
        )
    return FolderScan(root=root, images=tuple(images), skipped=tuple(skipped))


def class_folders(root: Path) -> list[str]:
    """The class folder names under ``root``, sorted (hidden folders are not classes).

    Raises
    ------
    DataError
        If ``root`` is missing or has no class sub-folders.
    """
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(
            f"data folder {root} has no class sub-folders; expected one folder per class, "
            f"e.g. {root}/benign/img1.png and {root}/malignant/img2.png"
        )
    return classes


def walk_folder(root: Path, classes: list[str] | None = None) -> Iterator[tuple[str, Path]]:
    """``(class folder name, file)`` for every non-hidden file below each class folder, in a stable order."""
    for label_dir in class_folders(root) if classes is None else classes:
        base = root / label_dir
        for path in sorted(base.rglob("*")):
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(base).parts):
                yield label_dir, path


def read_file(path: Path, read: Callable[[Path], Decoded]) -> Decoded | SkippedFile:
    """The one decision about a file, shared by the loader and the scan: its image, or why it is skipped."""
    if file_kind(path) is None:
        what = f"file type {path.suffix.lower()}" if path.suffix else "no extension and no DICOM marker"
        result: Decoded | SkippedFile = SkippedFile(path, f"not an image: {what} (images: PNG, JPEG, BMP, GIF, TIFF, WebP, DICOM)")
    else:
        try:
            result = read(path)
        except ImageDecodeError as exc:
            result = SkippedFile(path, str(exc))
    if isinstance(result, SkippedFile):
        _log.debug("skipped %s: %s", path, result.reason)
    return result
