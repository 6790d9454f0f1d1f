"""Backbone registry: one factory over named, typed specifications."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, WeightsError
from ._transform import ImageTransform
from ._types import FedModel, Preprocessing

__all__ = ["BackboneSpec", "register_backbone", "get_backbone", "list_backbones", "create_model"]

_log = logging.getLogger(f"fedlens.{__name__}")

IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class BackboneSpec:
    """Everything fedlens needs to know about one backbone.

    Attributes
    ----------
    name : str
        Registry key, as written in the config (``backbone = "..."``).
    preprocessing : Preprocessing
        Input size and normalisation the pretrained weights expect.
    build : callable
        ``build(state_dict_or_None) -> FedModel`` with the 1000-class ImageNet head.
    fetch_weights : callable
        ``fetch_weights(weights_path_or_None) -> state_dict`` in the layout ``build``
        accepts. Raises :class:`WeightsError` with instructions when unavailable.
    weights_source : str
        Where pretrained weights come from, for model cards and ``--help``.
    """

    name: str
    preprocessing: Preprocessing
    build: Callable[[dict[str, torch.Tensor] | None], FedModel]
    fetch_weights: Callable[[str | None], dict[str, torch.Tensor]]
    weights_source: str

    def transforms(self, *, image_size: int | None = None) -> ImageTransform:
        """The preprocessing object for this backbone, like torchvision's ``weights.transforms()``.

        Parameters
        ----------
        image_size : int, optional
            Side of the square the model sees (the config's ``image-size``); default:
            the size the weights were trained at.
        """
        size = self.preprocessing.input_size if image_size is None else image_size
        return ImageTransform(image_size=size, preprocessing=self.preprocessing)


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry.

    Raises
    ------
    ValueError
        If the name is already taken.
    """
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_backbone(name: str) -> BackboneSpec:
    """Return the registered spec called ``name``.

    Raises
    ------
    ConfigError
        If no backbone has that name; the message lists the valid ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; choose one of: {', '.join(list_backbones())}") from None


def list_backbones() -> list[str]:
    """Names of all registered backbones, sorted."""
    return sorted(_REGISTRY)


def _reset_classifier(model: FedModel, num_classes: int) -> None:
    # The new head starts at zero: the first rounds then move the head before the
    # features, which keeps early federated averages of many sites stable.
    classifier = model.stages.classifier
    assert isinstance(classifier, nn.Sequential)
    linear = classifier[-1]
    assert isinstance(linear, nn.Linear)
    head = nn.Linear(linear.in_features, num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    classifier[-1] = head


def create_model(
    name: str,
    *,
    num_classes: int,
    pretrained: bool = True,
    weights_path: str | None = None,
) -> FedModel:
    """Build a backbone with a ``num_classes`` classifier.

    Parameters
    ----------
    name : str
        A registered backbone name.
    num_classes : int
        Number of output classes. With ``1000`` and pretrained weights the ImageNet
        classifier is kept.
    pretrained : bool
        Load ImageNet weights. ``False`` gives random weights and is logged loudly;
        there is no silent fallback from one to the other.
    weights_path : str, optional
        A local weights file to use instead of the backbone's default source.

    Raises
    ------
    WeightsError
        If pretrained weights are requested and cannot be had.
    """
    spec = get_backbone(name)
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
    if pretrained:
        state = spec.fetch_weights(weights_path or None)
        model = spec.build(state)
    else:
        if weights_path:
            raise ConfigError("`weights-path` is set but `pretrained = false`: remove one of them")
        _log.warning("backbone %s starts from RANDOM weights (pretrained = false)", name)
        model = spec.build(None)
    if num_classes != IMAGENET_CLASSES or not pretrained:
        _reset_classifier(model, num_classes)
    return model


def load_into(model: nn.Module, state: dict[str, torch.Tensor], *, what: str) -> None:
    """Load ``state`` strictly, turning mismatches into a :class:`WeightsError`."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{what} does not fit the model: {str(exc).splitlines()[0]}") from exc
