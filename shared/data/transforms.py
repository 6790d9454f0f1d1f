"""Training-time augmentation on top of the backbone's :class:`~shared.models.ImageTransform`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import augment_names
from ..models import ImageTransform

__all__ = ["Augment", "parse_augment"]


@dataclass(frozen=True)
class Augment:
    """Which training augmentations are on. Evaluation never augments."""

    flip: bool = False
    crop: bool = False
    color: bool = False

    @property
    def any(self) -> bool:
        return self.flip or self.crop or self.color

    def apply(self, images: torch.Tensor, *, transform: ImageTransform, generator: torch.Generator | None = None) -> torch.Tensor:
        """The training counterpart of ``transform(images)``: same channels and normalisation, random views.

        ``crop`` replaces the resize policy with a random resized crop (0.6 to 1 of the
        area, aspect ratio 3/4 to 4/3); ``flip`` mirrors half of the images; ``color``
        jitters brightness and contrast by up to 20 %. With nothing on, the result is
        exactly ``transform(images)``.

        Parameters
        ----------
        images : Tensor
            ``uint8 [B, 1|3, H, W]`` as stored in an :class:`ImageSet`.
        transform : ImageTransform
            The backbone's preprocessing.
        generator : torch.Generator, optional
            Source of all randomness here (the global RNG when ``None``).
        """
        x = transform.to_unit(images)
        if self.crop:
            x = _random_resized_crop(x, transform.image_size, generator)
        else:
            x = transform.resize(x)
        if self.flip:
            flip = torch.rand(x.shape[0], generator=generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if self.color:
            b = 1.0 + (torch.rand(x.shape[0], 1, 1, 1, generator=generator) - 0.5) * 0.4
            c = 1.0 + (torch.rand(x.shape[0], 1, 1, 1, generator=generator) - 0.5) * 0.4
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = ((x * b - mean) * c + mean).clamp_(0.0, 1.0)
        return transform.normalize(x)


def parse_augment(text: str) -> Augment:
    """Parse ``"none"`` or a comma list of ``flip``, ``crop``, ``color``.

    Raises
    ------
    ConfigError
        For unknown names.
    """
    names = augment_names(text)
    return Augment(flip="flip" in names, crop="crop" in names, color="color" in names)


def _random_resized_crop(x: torch.Tensor, size: int, generator: torch.Generator | None) -> torch.Tensor:
    # Scale in [0.6, 1] of the area and aspect ratio in [3/4, 4/3], one crop per image.
    n, _, h, w = x.shape
    out = torch.empty(n, 3, size, size)
    area = torch.empty(n).uniform_(0.6, 1.0, generator=generator)
    log_ratio = torch.empty(n).uniform_(-0.2877, 0.2877, generator=generator)
    for i in range(n):
        ratio = float(log_ratio[i].exp())
        cw = min(w, max(1, round((float(area[i]) * h * w * ratio) ** 0.5)))
        ch = min(h, max(1, round((float(area[i]) * h * w / ratio) ** 0.5)))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
        crop = x[i : i + 1, :, top : top + ch, left : left + cw]
        out[i] = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
    return out
