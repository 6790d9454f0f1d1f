"""Data sets, decoding, preprocessing and frozen-feature caching."""

from ._decode import IMAGE_SUFFIXES, ImageDecodeError, decode_image
from ._factory import load_dataset, stratified_cap, stratified_split
from ._imageset import ImageSet, LoadReport
from ._sources import FASHION_MNIST_CLASSES, load_fashion_mnist, load_image_folder, load_npz
from .features import cached_features, compute_features, default_cache_dir, feature_cache_path
from .transforms import Augment, ImageTransform, parse_augment

__all__ = [
    "Augment",
    "FASHION_MNIST_CLASSES",
    "IMAGE_SUFFIXES",
    "ImageDecodeError",
    "ImageSet",
    "ImageTransform",
    "LoadReport",
    "cached_features",
    "compute_features",
    "feature_cache_path",
    "decode_image",
    "default_cache_dir",
    "load_dataset",
    "load_fashion_mnist",
    "load_image_folder",
    "load_npz",
    "parse_augment",
    "stratified_cap",
    "stratified_split",
]
