"""Backbones, fine-tune policies, the uniform :class:`FedModel` shape and each backbone's preprocessing."""

from . import _builtin  # noqa: F401  (registers the shipped backbones)
from ._decode import DICOM_SUFFIXES, IMAGE_SUFFIXES, Decoded, ImageDecodeError, ImageInfo, file_kind
from ._lowrank import LowRankConv, apply_low_rank, is_pointwise_conv
from ._policy import FineTunePolicy, apply_policy, load_trainable, parse_policy, train_mode, trainable_state_dict
from ._registry import BackboneSpec, create_model, get_backbone, list_backbones, register_backbone
from ._transform import RESIZE_POLICY, ImageTransform, decode_image, read_image
from ._types import FedModel, Preprocessing
from ._weights import LITE0_SHA256, load_state_dict_file, sha256_of

__all__ = [
    "LowRankConv",
    "apply_low_rank",
    "is_pointwise_conv",
    "BackboneSpec",
    "DICOM_SUFFIXES",
    "Decoded",
    "IMAGE_SUFFIXES",
    "ImageInfo",
    "file_kind",
    "read_image",
    "FedModel",
    "FineTunePolicy",
    "ImageDecodeError",
    "ImageTransform",
    "LITE0_SHA256",
    "Preprocessing",
    "RESIZE_POLICY",
    "apply_policy",
    "create_model",
    "decode_image",
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
