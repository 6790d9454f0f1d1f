"""Folding a trained model into plain convolutions for inference.

Two exact rewrites (up to float rounding) of a model in eval mode:

- a low-rank adapter ``W x + U (D x)`` (:class:`~shared.models.LowRankConv`) becomes
  one 1x1 convolution with weight ``W + U D``;
- a BatchNorm right after a convolution in the same ``nn.Sequential`` becomes part of
  that convolution's weight and bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``).

The folded graph has fewer and larger operations, which is what ONNX Runtime and its
INT8 quantizer want. BatchNorms that do not follow a convolution inside a
``Sequential`` (the two inside each ResNet basic block) are left as they are and
counted; ONNX Runtime fuses those itself when it loads the graph.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..models import LowRankConv

__all__ = ["FoldResult", "fold_for_inference"]


@dataclass(frozen=True)
class FoldResult:
    """The folded copy and what was folded."""

    model: nn.Module
    adapters_merged: int
    batchnorms_folded: int
    batchnorms_left: int

    def to_dict(self) -> dict[str, int]:
        return {
            "adapters_merged": self.adapters_merged,
            "batchnorms_folded": self.batchnorms_folded,
            "batchnorms_left": self.batchnorms_left,
        }


def _merge_low_rank(model: nn.Module) -> int:
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LowRankConv):
                conv = copy.deepcopy(child.base)
                update = child.up.weight[:, :, 0, 0] @ child.down.weight[:, :, 0, 0]
                with torch.no_grad():
                    conv.weight.add_(update[:, :, None, None].to(conv.weight.dtype))
                setattr(parent, name, conv.requires_grad_(False))
                count += 1
    return count


def _conv_before(seq: nn.Sequential, name: str) -> tuple[nn.Module, str] | None:
    """``(owner, name)`` of the convolution whose output child ``name`` of ``seq`` returns, if any."""
    prev = getattr(seq, name)
    if type(prev) is nn.Conv2d:
        return seq, name
    if isinstance(prev, nn.Sequential) and len(prev):
        last_name, last = list(prev.named_children())[-1]
        if type(last) is nn.Conv2d:  # e.g. Lite0's (same-padding, strided conv)
            return prev, last_name
    return None


def _fold_batchnorm(model: nn.Module) -> int:
    count = 0
    for seq in list(model.modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        names = [name for name, _ in seq.named_children()]
        for prev_name, name in zip(names, names[1:]):
            bn = getattr(seq, name)
            found = _conv_before(seq, prev_name) if type(bn) is nn.BatchNorm2d else None
            if found is None:
                continue
            owner, conv_name = found
            setattr(owner, conv_name, fuse_conv_bn_eval(getattr(owner, conv_name), bn))
            setattr(seq, name, nn.Identity())
            count += 1
    return count


def fold_for_inference(model: nn.Module) -> FoldResult:
    """A folded copy of ``model`` for inference; ``model`` itself is not changed.

    The copy is in eval mode, on the CPU, in float32 and in the default memory
    format; its outputs equal ``model``'s in eval mode up to float rounding.

    Parameters
    ----------
    model : nn.Module
        A trained model, e.g. :attr:`LoadedModel.model`.

    Returns
    -------
    FoldResult
        The copy, with how many adapters were merged and BatchNorms folded or left.
    """
    net = copy.deepcopy(model).cpu().float().eval().to(memory_format=torch.contiguous_format)
    adapters = _merge_low_rank(net)
    folded = _fold_batchnorm(net)
    left = sum(isinstance(m, _BatchNorm) for m in net.modules())
    for p in net.parameters():
        p.requires_grad_(False)
    return FoldResult(model=net, adapters_merged=adapters, batchnorms_folded=folded, batchnorms_left=left)
