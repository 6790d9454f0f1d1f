"""Uploaded bytes to the model's decoded input, through the one decoding path training uses.

The decoder (:meth:`ImageTransform.decode`: pixel limit before any pixel is decoded,
reduced-scale decoding of large files, EXIF orientation, DICOM, the resize policy) reads
files, so an upload is written to a private spool folder, decoded and removed. An
undecodable upload maps to an HTTP status by the decoder's reason.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from fedlens.shared.models import ImageDecodeError, ImageTransform

__all__ = ["BadImage", "ImageSpool", "decode_base64", "status_for"]

# Decoder reason category -> HTTP status: 413 for what is too large, 415 for what is not
# an image fedlens reads, 422 for an image that is cut short or damaged.
_STATUS = {"decompression bomb": 413, "not an image": 415, "unsupported": 415, "empty file": 422, "truncated": 422, "damaged": 422}


class BadImage(Exception):
    """An input that is not a usable image; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def status_for(error: ImageDecodeError) -> int:
    """The HTTP status for a decoder refusal (415, 422 or 413)."""
    return _STATUS.get(error.category, 422)


def decode_base64(text: str, what: str) -> bytes:
    """The bytes of a base64 string, with or without a ``data:...;base64,`` prefix.

    Raises
    ------
    BadImage
        422 when it is not base64.
    """
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadImage(422, f"{what}: not valid base64") from None


class ImageSpool:
    """Decodes uploads with a model's transform via a private temporary folder.

    Parameters
    ----------
    max_pixels : int
        Larger images are refused from their header (the decompression-bomb guard).
    """

    def __init__(self, *, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self._dir = tempfile.TemporaryDirectory(prefix="fedlens-serve-")

    def close(self) -> None:
        self._dir.cleanup()

    def decode(self, data: bytes, transform: ImageTransform, what: str) -> np.ndarray:
        """``uint8 [C, S, S]`` (S = the model's image size) from an uploaded file's bytes.

        Raises
        ------
        BadImage
            With the status for the decoder's reason (``what`` names the input in the message).
        """
        if not data:
            raise BadImage(422, f"{what}: empty file: 0 bytes")
        fd, name = tempfile.mkstemp(dir=self._dir.name)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return transform.decode(Path(name), max_pixels=self.max_pixels)
        except ImageDecodeError as exc:
            raise BadImage(status_for(exc), f"{what}: {exc}") from None
        finally:
            os.unlink(name)

    def from_tensor(self, pixels: np.ndarray, transform: ImageTransform, what: str) -> np.ndarray:
        """A decoded ``uint8 [C, H, W]`` image (C = 1 or 3) brought to the model's size by the resize policy.

        Raises
        ------
        BadImage
            413 over the pixel limit, 422 for a wrong shape.
        """
        if pixels.ndim != 3 or pixels.shape[0] not in (1, 3) or min(pixels.shape[1:]) < 1:
            raise BadImage(422, f"{what}: a decoded image is uint8 [C, H, W] with C = 1 or 3, got shape {list(pixels.shape)}")
        if pixels.shape[1] * pixels.shape[2] > self.max_pixels:
            raise BadImage(413, f"{what}: decompression bomb: {pixels.shape[1] * pixels.shape[2]} px > max-image-pixels {self.max_pixels}")
        resized = transform.resize(torch.from_numpy(np.ascontiguousarray(pixels))[None])[0]
        return np.ascontiguousarray(resized.numpy())
