"""Data sets, their sources and augmentation, and frozen-feature caching.

Decoding and preprocessing belong to the backbone: see :class:`shared.models.ImageTransform`.
"""

from ._factory import load_dataset, stratified_cap, stratified_split
from ._imageset import ImageSet, LoadReport
from ._sources import FASHION_MNIST_CLASSES, IMAGE_SUFFIXES, load_fashion_mnist, load_image_folder, load_npz
from .check import DATA_CHECK_FILE, DataCheck, check_data, write_data_check
from .features import cached_features, compute_features, default_cache_dir, feature_cache_path
from .labels import ClassMap, LabelMismatch, LabelPlan, load_class_map, plan_labels, relabel
from .scan import FolderScan, ImageFacts, SkippedFile, scan_folder
from .transforms import Augment, parse_augment

__all__ = [
    "Augment",
    "DATA_CHECK_FILE",
    "DataCheck",
    "check_data",
    "write_data_check",
    "ClassMap",
    "LabelMismatch",
    "LabelPlan",
    "FASHION_MNIST_CLASSES",
    "FolderScan",
    "ImageFacts",
    "SkippedFile",
    "scan_folder",
    "IMAGE_SUFFIXES",
    "ImageSet",
    "LoadReport",
    "cached_features",
    "compute_features",
    "feature_cache_path",
    "default_cache_dir",
    "load_dataset",
    "load_fashion_mnist",
    "load_image_folder",
    "load_npz",
    "load_class_map",
    "plan_labels",
    "relabel",
    "parse_augment",
    "stratified_cap",
    "stratified_split",
]
