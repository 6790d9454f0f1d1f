"""Batched preprocessing tied to the backbone's weights, plus optional augmentation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import augment_names
from ..models import Preprocessing

__all__ = ["Augment", "parse_augment", "ImageTransform"]



@dataclass(frozen=True)
class Augment:
    """Which training augmentations are on. Evaluation never augments."""

    flip: bool = False
    crop: bool = False
    color: bool = False

    @property
    def any(self) -> bool:
        return self.flip or self.crop or self.color


def parse_augment(text: str) -> Augment:
    """Parse ``"none"`` or a comma list of ``flip``, ``crop``, ``color``.

    Raises
    ------
    ConfigError
        For unknown names.
    """
    names = augment_names(text)
    return Augment(flip="flip" in names, crop="crop" in names, color="color" in names)


class ImageTransform:
    """Turn ``uint8 [B, C, H, W]`` batches into normalised ``float [B, 3, S, S]``.

    Grey images are repeated to three channels, every image is resized to
    ``image_size`` and normalised with the backbone's mean and std.

    Parameters
    ----------
    image_size : int
        Output side length.
    preprocessing : Preprocessing
        The backbone's normalisation.
    augment : Augment
        Training-time augmentation (applied only when ``train=True``).
    """

    def __init__(self, *, image_size: int, preprocessing: Preprocessing, augment: Augment = Augment()) -> None:
        self.image_size = image_size
        self.augment = augment
        self._mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor, *, train: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        x = images.float().div_(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if train and self.augment.crop:
            x = self._random_resized_crop(x, generator)
        elif x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True)
        if train and self.augment.flip:
            flip = torch.rand(x.shape[0], generator=generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if train and self.augment.color:
            b = 1.0 + (torch.rand(x.shape[0], 1, 1, 1, generator=generator) - 0.5) * 0.4
            c = 1.0 + (torch.rand(x.shape[0], 1, 1, 1, generator=generator) - 0.5) * 0.4
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = ((x * b - mean) * c + mean).clamp_(0.0, 1.0)
        return (x - self._mean.to(x.device)) / self._std.to(x.device)

    def _random_resized_crop(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        # Scale in [0.6, 1] of the area and aspect ratio in [3/4, 4/3], one crop per image.
        n, _, h, w = x.shape
        out = torch.empty(n, 3, self.image_size, self.image_size)
        area = torch.empty(n).uniform_(0.6, 1.0, generator=generator)
        log_ratio = torch.empty(n).uniform_(-0.2877, 0.2877, generator=generator)
        for i in range(n):
            ratio = float(log_ratio[i].exp())
            cw = min(w, max(1, round((float(area[i]) * h * w * ratio) ** 0.5)))
            ch = min(h, max(1, round((float(area[i]) * h * w / ratio) ** 0.5)))
            top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
            crop = x[i : i + 1, :, top : top + ch, left : left + cw]
            out[i] = F.interpolate(crop, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)[0]
        return out
