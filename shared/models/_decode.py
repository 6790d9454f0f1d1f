"""Reading one image file of any common mode as upright ``uint8 [C, H, W]`` at its stored size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageDecodeError", "read_image"]


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


def read_image(path: str | Path) -> np.ndarray:
    """Read ``path`` as ``uint8 [C, H, W]`` with C = 1 (grey) or 3 (colour), upright.

    The EXIF orientation tag is applied (a phone photo taken upright is returned
    upright); no resizing happens here.

    Parameters
    ----------
    path : path-like
        A PNG, JPEG, BMP, GIF, TIFF or WebP file; grey, RGB, RGBA, palette and 16-bit
        images are all accepted.

    Raises
    ------
    ImageDecodeError
        For empty, truncated, oversized (decompression bomb) or non-image files.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageDecodeError("empty file (0 bytes)")
        with Image.open(path) as img:
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            # PIL's buffers are read-only: hand out an array that owns its memory.
            return np.require(_to_uint8(img), requirements=["C", "W", "O"])
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"cannot decode image ({exc})") from exc
