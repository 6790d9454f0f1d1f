"""Reading one photo-format image file as upright ``uint8 [C, H, W]``; the facts and errors shared with DICOM.

DICOM files are read by ``_dicom``; :func:`file_kind` says which reader a file goes to.

Hostile and odd files are the rule at real sites, so every step is bounded:

- the stored size is checked against a pixel limit *before* any pixel is decoded
  (decompression bombs are refused, not allocated);
- large JPEGs are decoded at a reduced scale (libjpeg's DCT scaling, PIL's
  ``draft``) and other large images are box-reduced right after decoding, never
  below twice the size the caller needs;
- only the first frame of an animated GIF or a multi-page TIFF is read;
- only the photo formats fedlens names are opened (PIL would otherwise hand an
  ``.png``-named EPS file to Ghostscript).

A file that cannot be used raises :class:`ImageDecodeError` whose message is the
reason, ``"category: detail"`` (categories: ``empty file``, ``not an image``,
``decompression bomb``, ``truncated``, ``damaged``, ``unsupported``). Reasons never
quote a value read from inside a file, so a DICOM file's patient data cannot reach
a log through them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..config import DEFAULT_MAX_IMAGE_PIXELS

__all__ = [
    "Decoded",
    "ImageDecodeError",
    "ImageInfo",
    "IMAGE_SUFFIXES",
    "DICOM_SUFFIXES",
    "check_not_empty",
    "check_pixels",
    "decode_photo",
    "file_kind",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
# The PIL formats behind IMAGE_SUFFIXES ("JPEG" also opens MPO, a phone's JPEG with extra pictures).
_PIL_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
# Large images are reduced to no less than this many times the size the caller
# needs, so the antialiased resize that follows still has real pixels to average.
_REDUCING_GAP = 2
# EXIF orientation -> the transpose that shows the image upright.
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageDecodeError(Exception):
    """One file could not be turned into an image; the message is the reason (``category: detail``)."""

    @property
    def category(self) -> str:
        """The reason's first part (``truncated``, ``decompression bomb``, ...), for counting."""
        return str(self).split(":", 1)[0]


@dataclass(frozen=True)
class ImageInfo:
    """What a file's header says about its image (the stored size, before any reduction).

    ``mode`` is PIL's (``"L"``, ``"RGB"``, ``"I;16"``, ``"P"``, ``"CMYK"``) or
    ``"DICOM <photometric interpretation>"``; ``bit_depth`` is bits per sample as
    stored (8, 12, 16); ``frames`` counts frames or pages (only the first is used).
    """

    width: int
    height: int
    mode: str
    bit_depth: int
    frames: int = 1


@dataclass(frozen=True)
class Decoded:
    """A decoded image: ``pixels`` is upright ``uint8 [C, H, W]`` (C = 1 or 3); ``info`` its header facts."""

    pixels: np.ndarray
    info: ImageInfo


def file_kind(path: Path) -> Literal["image", "dicom"] | None:
    """What reader a file goes to: by suffix, or ``DICM`` at byte 128 (DICOM files often have no extension).

    ``None`` for files fedlens does not read (a ``.txt``, a ``Thumbs.db``).
    """
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return "dicom" if fh.read(4) == b"DICM" else None
    except OSError:
        return None


def check_pixels(width: int, height: int, *, max_pixels: int) -> None:
    """Refuse a frame of ``width x height`` over ``max_pixels`` (raises :class:`ImageDecodeError`)."""
    pixels = int(width) * int(height)
    if pixels > max_pixels:
        raise ImageDecodeError(f"decompression bomb: {pixels} px > max-image-pixels {max_pixels}")


def check_not_empty(path: Path) -> None:
    """Refuse an empty or unreadable file (raises :class:`ImageDecodeError`)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageDecodeError(f"damaged: cannot read the file ({exc.strerror})") from exc
    if size == 0:
        raise ImageDecodeError("empty file: 0 bytes")


def decode_photo(path: Path, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, min_side: int | None = None) -> Decoded:
    """Decode the first frame of a PNG, JPEG, BMP, GIF, TIFF or WebP file as upright ``uint8 [C, H, W]``.

    Parameters
    ----------
    path : Path
        The file; grey, RGB, RGBA, palette, CMYK and 16-bit images are accepted, and
        the EXIF orientation is applied.
    max_pixels : int
        Frames with more pixels are refused from the header, before decoding.
    min_side : int, optional
        The caller's target size: a large image may be decoded or reduced to a
        smaller scale as long as its shorter side stays at least twice this. ``None``
        decodes at the stored size.

    Raises
    ------
    ImageDecodeError
        With the reason: empty, not an image, over ``max_pixels``, truncated or damaged.
    """
    check_not_empty(path)
    try:
        with _open(path) as img:
            info = _info(img, path)
            check_pixels(info.width, info.height, max_pixels=max_pixels)
            orientation = img.getexif().get(0x0112, 1)
            if min_side and img.format in ("JPEG", "MPO"):
                img.draft(None, (_REDUCING_GAP * min_side, _REDUCING_GAP * min_side))
            img.load()
            out = _to_8bit(img)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not an image: no PNG, JPEG, BMP, GIF, TIFF or WebP data") from exc
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"decompression bomb: {exc}") from exc
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        text = str(exc)
        if "truncated" in text or isinstance(exc, EOFError):
            raise ImageDecodeError(f"truncated: {text or 'the image data ends early'}") from exc
        raise ImageDecodeError(f"damaged: {text or type(exc).__name__}") from exc
    if min_side:
        factor = min(out.size) // (_REDUCING_GAP * min_side)
        if factor >= 2:
            out = out.reduce(factor)
    if orientation in _ORIENTATION:
        out = out.transpose(_ORIENTATION[orientation])
    arr = np.asarray(out, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    # PIL's buffers are read-only: hand out an array that owns its memory.
    return Decoded(np.require(arr, requirements=["C", "W", "O"]), info)


_PIL_LIMIT_LOCK = threading.Lock()


@contextmanager
def _open(path: Path) -> Iterator[Image.Image]:
    """``Image.open`` with PIL's own pixel limit lifted while the header is read.

    fedlens checks the size itself (``max-image-pixels``, which a site may set above
    PIL's default); PIL's process-wide limit is restored before any pixel is decoded.
    """
    with _PIL_LIMIT_LOCK:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            img = Image.open(path, formats=_PIL_FORMATS)
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    with img:
        yield img


def _info(img: Image.Image, path: Path) -> ImageInfo:
    # MPO: a phone's JPEG whose extra pictures are previews, not frames of the image.
    frames = 1 if img.format == "MPO" else int(getattr(img, "n_frames", 1))
    return ImageInfo(width=img.width, height=img.height, mode=img.mode, bit_depth=_bit_depth(img, path), frames=frames)


def _bit_depth(img: Image.Image, path: Path) -> int:
    if img.format == "PNG":
        with path.open("rb") as fh:
            header = fh.read(25)
        if len(header) == 25:
            return header[24]  # IHDR bit depth: 1, 2, 4, 8 or 16
    if img.format in ("JPEG", "MPO"):
        return int(getattr(img, "bits", 8))
    if img.format == "TIFF":
        bits = img.tag_v2.get(258)  # type: ignore[attr-defined]  # BitsPerSample
        if bits:
            return int(bits[0] if isinstance(bits, tuple) else bits)
    if img.mode == "1":
        return 1
    if img.mode.startswith("I;16"):
        return 16
    return 32 if img.mode in ("I", "F") else 8


def _to_8bit(img: Image.Image) -> Image.Image:
    """Any decoded mode as an ``"L"`` or ``"RGB"`` image."""
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit (and 32-bit integer) scans: map the full 16-bit range to 8 bits, so
        # intensities stay comparable between images (no per-image stretching).
        arr = np.asarray(img, dtype=np.float32)
        return Image.fromarray(np.clip(arr / 257.0, 0, 255).round().astype(np.uint8))
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(arr * scale, 0, 255).round().astype(np.uint8))
    if img.mode in ("L", "RGB"):
        return img  # no copy: a large photo is held once
    if img.mode in ("1", "LA"):
        return img.convert("L")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "PA"):
        # Transparent pixels become black rather than whatever colour they carried.
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")
