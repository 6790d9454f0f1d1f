"""The model shape every backbone is adapted to, and its preprocessing."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Preprocessing", "FedModel"]


@dataclass(frozen=True)
class Preprocessing:
    """How images must look before they enter a backbone: what its weights expect.

    This is metadata; the object that applies it is the backbone's
    :class:`~shared.models.ImageTransform`, from ``BackboneSpec.transforms(image_size=...)``.

    Attributes
    ----------
    input_size : int
        The side length the weights were trained at (the default image size is
        set separately in the config, because small images train much faster).
    mean, std : tuple of float
        Per-channel normalisation applied to RGB values in [0, 1].
    """

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class FedModel(nn.Module):
    """A classifier as an ordered list of named stages.

    Every backbone is adapted to the same shape::

        stem -> block0 ... blockK -> pool -> neck -> classifier

    so that fine-tune policies ("train the last N blocks"), frozen-prefix feature
    caching and Grad-CAM on the last convolutional stage work the same for all.

    Parameters
    ----------
    stem : nn.Module
        Layers before the first block.
    blocks : list of nn.Module
        The blocks a ``last-N`` policy counts from the end.
    neck : nn.Module
        Layers between global pooling and the classifier (``nn.Identity`` when none).
    classifier : nn.Module
        The final layer(s) producing logits.
    """

    def __init__(
        self,
        *,
        stem: nn.Module,
        blocks: list[nn.Module],
        neck: nn.Module,
        classifier: nn.Module,
    ) -> None:
        super().__init__()
        named: list[tuple[str, nn.Module]] = [("stem", stem)]
        named += [(f"block{i}", block) for i, block in enumerate(blocks)]
        named += [
            ("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))),
            ("neck", neck),
            ("classifier", classifier),
        ]
        self.stages = nn.Sequential(OrderedDict(named))
        self.num_blocks = len(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    def forward_from(self, z: torch.Tensor, start: int) -> torch.Tensor:
        """Run stages ``start:`` on ``z`` (the output of stage ``start - 1``)."""
        for stage in self.stages[start:]:
            z = stage(z)
        return z

    def forward_until(self, x: torch.Tensor, stop: int) -> torch.Tensor:
        """Run stages ``:stop`` on images ``x``."""
        for stage in self.stages[:stop]:
            x = stage(x)
        return x

    @property
    def last_conv_stage(self) -> nn.Module:
        """The last spatial stage: the natural Grad-CAM layer."""
        return self.stages[self.num_blocks]

    def block_index(self, i: int) -> int:
        """Stage index of block ``i`` (negative counts from the end)."""
        if i < 0:
            i += self.num_blocks
        return 1 + i
