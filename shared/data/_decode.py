"""Decoding one image file of any common mode into ``uint8 [C, H, W]``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["decode_image", "ImageDecodeError", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


class ImageDecodeError(Exception):
    """One file could not be turned into an image; the message names why."""


def _to_uint8(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (and 32-bit integer) scans: map the full 16-bit range to 8 bits, so
        # intensities stay comparable between images (no per-image stretching).
        arr = np.asarray(img, dtype=np.float64)
        return np.clip(arr / 257.0, 0, 255).round().astype(np.uint8)[None]
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(arr * scale, 0, 255).round().astype(np.uint8)[None]
    if img.mode in ("L", "1"):
        return np.asarray(img.convert("L"), dtype=np.uint8)[None]
    if img.mode == "LA":
        return np.asarray(img.convert("L"), dtype=np.uint8)[None]
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "PA"):
        # Transparent pixels become black rather than whatever colour they carried.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)


def decode_image(path: str | Path, size: int | None = None) -> np.ndarray:
    """Read ``path`` as ``uint8 [C, H, W]`` with C = 1 (grey) or 3 (colour).

    Parameters
    ----------
    path : path-like
        A PNG, JPEG, BMP, GIF, TIFF or WebP file; grey, RGB, RGBA, palette and 16-bit
        images are all accepted.
    size : int, optional
        Resize the shorter side to ``size`` and centre-crop to ``size x size``.

    Raises
    ------
    ImageDecodeError
        For empty, truncated or non-image files.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageDecodeError("empty file (0 bytes)")
        with Image.open(path) as img:
            img.load()
            if size is not None:
                img = _resize_center_crop(img, size)
            return _to_uint8(img)
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"cannot decode image ({exc})") from exc


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if img.mode == "P":
        img = img.convert("RGBA")
    resample = Image.Resampling.BILINEAR if img.mode not in ("I;16", "I;16B", "I;16L", "I;16N") else Image.Resampling.NEAREST
    img = img.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))
