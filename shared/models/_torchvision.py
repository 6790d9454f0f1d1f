"""Adapters that reshape torchvision classifiers into :class:`FedModel`.

torchvision's residual blocks add the skip connection in place (``out += identity``)
and use in-place activations. Opacus' hooks cannot differentiate through that, so
trainable blocks are wrapped in modules that add out of place. Wrapping (not
subclassing) keeps the original submodules and therefore their weights.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.efficientnet import MBConv
from torchvision.models.mobilenetv3 import InvertedResidual
from torchvision.models.resnet import BasicBlock

from ._types import FedModel

_M = TypeVar("_M", bound=nn.Module)

__all__ = ["adapt_resnet", "adapt_mobilenet_v3", "adapt_efficientnet", "disable_inplace"]


def disable_inplace(model: _M) -> _M:
    """Turn every in-place activation into an out-of-place one (same maths)."""
    for module in model.modules():
        if hasattr(module, "inplace") and isinstance(module.inplace, bool):
            module.inplace = False
    return model


class _BasicBlock(nn.Module):
    """ResNet basic block with an out-of-place skip add."""

    def __init__(self, inner: BasicBlock) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = inner.conv1, inner.bn1, inner.relu
        self.conv2, self.bn2, self.downsample = inner.conv2, inner.bn2, inner.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class _Residual(nn.Module):
    """MobileNetV3 / EfficientNet inverted residual with an out-of-place skip add."""

    def __init__(self, inner: InvertedResidual | MBConv) -> None:
        super().__init__()
        self.block = inner.block
        self.use_res_connect = inner.use_res_connect
        self.stochastic_depth = getattr(inner, "stochastic_depth", nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_res_connect:
            out = self.stochastic_depth(out) + x
        return out


def _wrap(block: nn.Module) -> nn.Module:
    if isinstance(block, BasicBlock):
        return _BasicBlock(block)
    if isinstance(block, (InvertedResidual, MBConv)):
        return _Residual(block)
    return block


def adapt_resnet(net: tvm.ResNet) -> FedModel:
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    blocks = [_wrap(b) for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
    return disable_inplace(FedModel(stem=stem, blocks=blocks, neck=nn.Identity(), classifier=nn.Sequential(net.fc)))


def adapt_mobilenet_v3(net: tvm.MobileNetV3) -> FedModel:
    feats = list(net.features)
    # classifier = Linear(576, 1024), Hardswish, Dropout, Linear(1024, 1000): the first
    # two are pretrained and belong to the trainable 'neck' of last-N policies.
    neck = nn.Sequential(net.classifier[0], net.classifier[1])
    classifier = nn.Sequential(net.classifier[2], net.classifier[3])
    model = FedModel(stem=feats[0], blocks=[_wrap(b) for b in feats[1:]], neck=neck, classifier=classifier)
    return disable_inplace(model)


def adapt_efficientnet(net: tvm.EfficientNet) -> FedModel:
    feats = list(net.features)
    blocks = [_wrap(b) for stage in feats[1:-1] for b in stage] + [feats[-1]]
    model = FedModel(stem=feats[0], blocks=blocks, neck=nn.Identity(), classifier=net.classifier)
    return disable_inplace(model)
