"""Low-rank adapters (LoRA) on the trainable pointwise convolutions.

``W x`` becomes ``W x + U (D x)`` with ``W`` frozen (pretrained), ``D`` (rank x in,
random) and ``U`` (out x rank, zero, so training starts from the pretrained model)
trainable. Under DP-SGD the noise grows with the number of trainable parameters:
a rank-16 adapter on Lite0's 1x1 head convolution trains 25.6 k numbers instead of
410 k, and sends 16x fewer bytes. ``D`` and ``U`` are 1x1 convolutions themselves,
so the one-pass book-keeping clipping applies.
"""

from __future__ import annotations

import math
from typing import TypeGuard

import torch
from torch import nn

from ._types import FedModel

__all__ = ["LowRankConv", "apply_low_rank", "is_pointwise_conv"]


class LowRankConv(nn.Module):
    """A frozen 1x1 convolution plus a trainable rank-``r`` update (out of place)."""

    def __init__(self, base: nn.Conv2d, rank: int) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.down = nn.Conv2d(base.in_channels, rank, 1, bias=False)
        self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.down.to(base.weight.device, base.weight.dtype)
        self.up.to(base.weight.device, base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


def is_pointwise_conv(m: nn.Module) -> TypeGuard[nn.Conv2d]:
    """True for a plain 1x1 convolution that is a per-pixel matrix product.

    Exactly ``nn.Conv2d`` (a subclass may override ``forward``, e.g. weight
    standardisation), 1x1 kernel, stride 1, no padding, no dilation, one group.
    The one test used by the low-rank adapters and by DP-SGD's fast clipping.
    """
    return (
        type(m) is nn.Conv2d
        and m.kernel_size == (1, 1)
        and m.stride == (1, 1)
        and m.padding in ((0, 0), "valid")
        and m.dilation == (1, 1)
        and m.groups == 1
    )


def apply_low_rank(model: FedModel, cut: int, rank: int) -> int:
    """Replace every trainable pointwise conv in ``stages[cut:]`` by a :class:`LowRankConv`.

    Returns
    -------
    int
        How many convolutions were adapted (0 when the trainable part has none).
    """
    count = 0
    for stage in list(model.stages)[cut:]:
        for parent in list(stage.modules()):
            for name, child in list(parent.named_children()):
                if is_pointwise_conv(child) and child.weight.requires_grad:
                    setattr(parent, name, LowRankConv(child, rank))
                    count += 1
    return count
