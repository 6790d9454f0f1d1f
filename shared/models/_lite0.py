"""EfficientNet-Lite0 with TensorFlow-style 'same' padding.

Layer names match the published PyTorch port of the ImageNet checkpoint
(``_conv_stem``, ``_blocks.N``, ``_fc``) so that its tensors load one to one.
Lite variants drop squeeze-excitation and use ReLU6, which keeps them friendly to
quantisation, Opacus and Captum alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["build_lite0", "remap_lite0_state_dict"]

# (repeats, kernel, stride, expand_ratio, in, out) of the seven stages.
_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01


class _SamePad(nn.Module):
    """Zero padding that makes a strided convolution match TensorFlow's 'SAME'."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pad_h = max((math.ceil(h / self.stride) - 1) * self.stride + self.kernel - h, 0)
        pad_w = max((math.ceil(w / self.stride) - 1) * self.stride + self.kernel - w, 0)
        return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Module:
    # A plain nn.Conv2d (not a subclass) so Opacus recognises it; strided convs get an
    # explicit parameter-free pad in front.
    if stride == 1:
        return nn.Conv2d(cin, cout, kernel, 1, kernel // 2, groups=groups, bias=False)
    return nn.Sequential(_SamePad(kernel, stride), nn.Conv2d(cin, cout, kernel, stride, 0, groups=groups, bias=False))


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation; out-of-place skip add."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, mid, 1, bias=False), _bn(mid), nn.ReLU6()]
        layers += [_conv(mid, mid, kernel, stride, groups=mid), _bn(mid), nn.ReLU6()]
        layers += [nn.Conv2d(mid, cout, 1, bias=False), _bn(cout)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out + x if self.residual else out


def build_lite0(num_classes: int, dropout: float = 0.2) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    """Build randomly initialised Lite0 parts: ``(stem, blocks, classifier)``.

    The last entry of ``blocks`` is the 1x1 'head' convolution to 1280 channels.
    """
    stem = nn.Sequential(_conv(3, 32, 3, 2), _bn(32), nn.ReLU6())
    blocks: list[nn.Module] = []
    for repeats, kernel, stride, expand, cin, cout in _STAGES:
        for r in range(repeats):
            blocks.append(_MBConv(cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand))
    blocks.append(nn.Sequential(nn.Conv2d(320, 1280, 1, bias=False), _bn(1280), nn.ReLU6()))
    classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))
    return stem, blocks, classifier


def _conv_key(module_prefix: str, strided: bool) -> str:
    return f"{module_prefix}.1.weight" if strided else f"{module_prefix}.weight"


def remap_lite0_state_dict(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the published checkpoint's tensors to :class:`FedModel` stage names."""
    out: dict[str, torch.Tensor] = {}

    def bn(dst: str, name: str) -> None:
        for field in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            out[f"{dst}.{field}"] = src[f"{name}.{field}"]

    out[_conv_key("stages.stem.0", True)] = src["_conv_stem.weight"]
    bn("stages.stem.1", "_bn0")
    index = 0
    for repeats, _kernel, stride, expand, _cin, _cout in _STAGES:
        for r in range(repeats):
            s = f"_blocks.{index}"
            d = f"stages.block{index}.body"
            i = 0
            if expand != 1:
                out[f"{d}.0.weight"] = src[f"{s}._expand_conv.weight"]
                bn(f"{d}.1", f"{s}._bn0")
                i = 3
            strided = (stride if r == 0 else 1) != 1
            out[_conv_key(f"{d}.{i}", strided)] = src[f"{s}._depthwise_conv.weight"]
            bn(f"{d}.{i + 1}", f"{s}._bn1")
            out[f"{d}.{i + 3}.weight"] = src[f"{s}._project_conv.weight"]
            bn(f"{d}.{i + 4}", f"{s}._bn2")
            index += 1
    out[f"stages.block{index}.0.weight"] = src["_conv_head.weight"]
    bn(f"stages.block{index}.1", "_bn1")
    out["stages.classifier.1.weight"] = src["_fc.weight"]
    out["stages.classifier.1.bias"] = src["_fc.bias"]
    return out
