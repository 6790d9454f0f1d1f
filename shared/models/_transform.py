"""The one preprocessing object: how a backbone sees an image at one image size.

Decoding a file (orientation included), the resize and crop policy, the channel
count and the normalisation all live in :class:`ImageTransform`, so training,
evaluation, explanation, prediction and the feature cache cannot disagree about
what an image looks like to the model. A backbone hands one out
(``get_backbone(name).transforms(image_size=96)``), as torchvision's
``weights.transforms()`` does.

What ``image-size`` means
-------------------------
``image-size`` is the side, in pixels, of the square every image is turned into
before it enters the model: the image's shorter side is scaled to ``image-size``
(bilinear, antialiased; up or down) and the longer side is then centre-cropped to
``image-size``, so the aspect ratio is kept and the centre of the image is what the
model sees. Square images (Fashion-MNIST, MedMNIST) are only scaled.

Files much larger than that are first decoded at a reduced scale (JPEG's DCT
scaling, a box filter otherwise), never below twice ``image-size`` on the shorter
side, so a 50-megapixel photo costs megabytes, not gigabytes; DICOM files go through
their own display chain first (window, VOI LUT, MONOCHROME1), see ``_dicom``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import DEFAULT_MAX_IMAGE_PIXELS
from ._decode import Decoded, decode_photo, file_kind
from ._dicom import decode_dicom
from ._types import Preprocessing

__all__ = ["ImageTransform", "decode_image", "read_image", "RESIZE_POLICY"]

RESIZE_POLICY = "shorter side to image-size, centre crop to a square; bilinear, antialiased"
# Bump whenever a step below changes the pixels a model sees: the feature cache key
# includes it, so features computed under an older policy are never reused.
# 2: large files are decoded at a reduced scale before the resize.
_POLICY_VERSION = 2


def _resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The resize policy on ``[B, C, H, W]`` (uint8 or float): shorter side to ``size``, centre crop."""
    h, w = int(images.shape[-2]), int(images.shape[-1])
    if h == size and w == size:
        return images
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    # Square inputs reduce to exactly `interpolate(size=(size, size))`, the call the
    # published Fashion-MNIST figures were measured with.
    out = F.interpolate(images, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    return out[..., top : top + size, left : left + size]


def read_image(path: str | Path, *, size: int | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Decoded:
    """Read an image or DICOM file: upright ``uint8 [C, H, W]`` pixels (C = 1 for grey, 3 for colour) and its header facts.

    Parameters
    ----------
    path : path-like
        A PNG, JPEG, BMP, GIF, TIFF or WebP file (grey, RGB, RGBA, palette, CMYK and
        16-bit; EXIF orientation applied), or a DICOM file; only the first frame of a
        multi-frame file is read (``info.frames`` says how many there are).
    size : int, optional
        Apply the resize policy (see the module docstring) to ``size x size``;
        ``None`` keeps the stored size. :meth:`ImageTransform.read` is this with
        the transform's ``image_size``.
    max_pixels : int
        Files whose frame has more pixels are refused before decoding (the config's
        ``max-image-pixels``).

    Raises
    ------
    ImageDecodeError
        With the reason (``category: detail``): empty, not an image, decompression
        bomb, truncated, damaged or unsupported.
    """
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    path = Path(path)
    decode = decode_dicom if file_kind(path) == "dicom" else decode_photo
    decoded = decode(path, max_pixels=max_pixels, min_side=size)
    if size is None:
        return decoded
    # uint8 in, uint8 out: the same antialiased bilinear filter as on batches, in
    # fixed point (within 1 grey level of the float result), without a float copy.
    fitted = _resize_center_crop(torch.from_numpy(decoded.pixels)[None], size)[0]
    return dataclasses.replace(decoded, pixels=np.ascontiguousarray(fitted.numpy()))


def decode_image(path: str | Path, *, size: int | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """The pixels of :func:`read_image`: upright ``uint8 [C, H, W]``, at ``size x size`` when given.

    Raises
    ------
    ImageDecodeError
        For empty, truncated, oversized, damaged or non-image files.
    """
    return read_image(path, size=size, max_pixels=max_pixels).pixels


class ImageTransform:
    """One backbone's preprocessing at one image size.

    Owns every step from a file or a stored ``uint8`` array to the model's input:

    1. decoding (any common file type and mode, EXIF orientation applied, DICOM
       through its display chain; large files at a reduced scale);
    2. the resize policy: shorter side to ``image_size``, centre crop to a square
       (bilinear, antialiased);
    3. channels: grey images are repeated to three;
    4. normalisation with the backbone's mean and std.

    Files are brought to ``image_size`` when read (:meth:`decode`), so a folder of
    large photos is held in memory at the size the model sees; arrays (Fashion-MNIST,
    MedMNIST) are kept at their stored size and brought to it per batch
    (:meth:`__call__`). Both go through the same policy.

    Parameters
    ----------
    image_size : int
        Side of the square the model sees (the config's ``image-size``).
    preprocessing : Preprocessing
        Mean and std the backbone's weights were trained with.
    """

    def __init__(self, *, image_size: int, preprocessing: Preprocessing) -> None:
        if int(image_size) < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        self.image_size = int(image_size)
        self.preprocessing = preprocessing
        self._mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)

    def __repr__(self) -> str:
        p = self.preprocessing
        return f"ImageTransform(image_size={self.image_size}, mean={p.mean}, std={p.std}, resize={RESIZE_POLICY!r})"

    @property
    def key(self) -> str:
        """Identifies every step that shapes the model's input (part of the feature cache key)."""
        p = self.preprocessing
        return json.dumps(
            {"policy": RESIZE_POLICY, "version": _POLICY_VERSION, "image_size": self.image_size, "mean": list(p.mean), "std": list(p.std)},
            sort_keys=True,
        )

    def read(self, path: str | Path, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Decoded:
        """:func:`read_image` at ``image_size``: the pixels the model sees (before normalisation) and the file's facts.

        Raises
        ------
        ImageDecodeError
            For empty, truncated, oversized, damaged or non-image files.
        """
        return read_image(path, size=self.image_size, max_pixels=max_pixels)

    def decode(self, path: str | Path, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
        """Read an image or DICOM file as upright ``uint8 [C, image_size, image_size]`` (C = 1 or 3).

        Raises
        ------
        ImageDecodeError
            For empty, truncated, oversized, damaged or non-image files.
        """
        return self.read(path, max_pixels=max_pixels).pixels

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """Apply the resize policy to a batch ``[B, C, H, W]``: shorter side to ``image_size``, centre crop."""
        return _resize_center_crop(images, self.image_size)

    def to_unit(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8 [B, 1|3, H, W]`` to ``float [B, 3, H, W]`` in [0, 1] (grey repeated to three channels).

        Raises
        ------
        TypeError
            If ``images`` are not ``uint8``.
        """
        if images.dtype != torch.uint8:
            raise TypeError(f"ImageTransform takes uint8 images as stored in an ImageSet, got {images.dtype}")
        x = images.float().div_(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return x

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``float [B, 3, H, W]`` in [0, 1] with the backbone's mean and std."""
        return (x - self._mean.to(x.device)) / self._std.to(x.device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8 [B, 1|3, H, W]`` to the model's input ``float [B, 3, image_size, image_size]``."""
        return self.normalize(self.resize(self.to_unit(images)))
