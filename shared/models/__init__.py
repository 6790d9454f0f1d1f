"""Backbones, fine-tune policies and the uniform :class:`FedModel` shape."""

from . import _builtin  # noqa: F401  (registers the shipped backbones)
from ._lowrank import LowRankConv, apply_low_rank
from ._policy import FineTunePolicy, apply_policy, load_trainable, parse_policy, train_mode, trainable_state_dict
from ._registry import BackboneSpec, create_model, get_backbone, list_backbones, register_backbone
from ._types import FedModel, Preprocessing
from ._weights import LITE0_SHA256, load_state_dict_file, sha256_of

__all__ = [
    "LowRankConv",
    "apply_low_rank",
    "BackboneSpec",
    "FedModel",
    "FineTunePolicy",
    "LITE0_SHA256",
    "Preprocessing",
    "apply_policy",
    "create_model",
    "get_backbone",
    "list_backbones",
    "load_state_dict_file",
    "load_trainable",
    "parse_policy",
    "register_backbone",
    "sha256_of",
    "train_mode",
    "trainable_state_dict",
]
