"""From a :class:`FedConfig` to ``(train pool, held-out test set)``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..config import FedConfig, parse_classes
from ..errors import DataError
from ..models import get_backbone
from ._imageset import ImageSet
from ._sources import load_fashion_mnist, load_image_folder, load_npz
from .features import default_cache_dir
from .labels import ClassMap, load_class_map, plan_labels, relabel

__all__ = ["load_dataset", "stratified_split", "stratified_cap"]

_log = logging.getLogger(f"fedlens.{__name__}")


def stratified_split(labels: np.ndarray, fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(rest, held_out)`` with ``fraction`` of each class held out.

    Every class with at least two images keeps at least one image on each side.
    """
    rng = np.random.default_rng(seed)
    held, rest = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_held = int(round(len(idx) * fraction))
        if len(idx) >= 2:
            n_held = min(max(n_held, 1), len(idx) - 1)
        held.append(idx[:n_held])
        rest.append(idx[n_held:])
    return np.sort(np.concatenate(rest)), np.sort(np.concatenate(held))


def stratified_cap(labels: np.ndarray, cap: int, *, seed: int) -> np.ndarray:
    """Indices of at most ``cap`` images with the class proportions of ``labels``."""
    if cap <= 0 or cap >= len(labels):
        return np.arange(len(labels))
    keep, _ = stratified_split(labels, 1.0 - cap / len(labels), seed=seed)
    return keep


def load_dataset(cfg: FedConfig) -> tuple[ImageSet, ImageSet]:
    """Load the configured data set as ``(train_pool, test)``.

    For ``folder`` and ``npz`` the test set is a stratified ``test-fraction`` of all
    images; Fashion-MNIST uses its official 10,000-image test split. Folder images are
    decoded by the configured backbone's :class:`~shared.models.ImageTransform` at
    ``image-size``; arrays keep their stored size and meet it per batch.

    Labels follow ``classes`` when it is set; the data's class names are mapped onto it
    by name, through ``class-map`` when one is given (:func:`~shared.data.labels.plan_labels`).

    Raises
    ------
    LabelMismatch
        When the data's class names do not fit ``classes``.
    DataError
        When the data cannot be found or read.
    """
    classes = parse_classes(cfg.classes) or None
    class_map = load_class_map(cfg.class_map) if cfg.class_map else None
    if cfg.dataset == "fashion-mnist":
        download_root = Path(cfg.cache_dir or default_cache_dir()) / "data"
        train, test = load_fashion_mnist(cfg.data_path or None, download_root=str(download_root))
        train, test = _named(train, classes, class_map), _named(test, classes, class_map)
    else:
        if cfg.dataset == "folder":
            transform = get_backbone(cfg.backbone).transforms(image_size=cfg.image_size)
            pool, _report = load_image_folder(
                cfg.data_path, transform=transform, max_pixels=cfg.max_image_pixels, classes=classes, class_map=class_map
            )
        else:
            pool = _named(load_npz(cfg.data_path), classes, class_map)
        if len(pool) < 2:
            raise DataError(f"{cfg.data_path} holds {len(pool)} image(s); at least 2 are needed to keep a test set")
        rest, held = stratified_split(pool.labels.numpy(), cfg.test_fraction, seed=cfg.seed)
        train, test = pool.subset(rest, f"{pool.name}-train"), pool.subset(held, f"{pool.name}-test")
    train = train.subset(stratified_cap(train.labels.numpy(), cfg.max_train_images, seed=cfg.seed), train.name)
    test = test.subset(stratified_cap(test.labels.numpy(), cfg.max_test_images, seed=cfg.seed + 1), test.name)
    _log.debug("data: %d training images, %d test images, %d classes", len(train), len(test), train.num_classes)
    return train, test


def _named(images: ImageSet, classes: tuple[str, ...] | None, class_map: ClassMap | None) -> ImageSet:
    """An array data set under the configured label set (unchanged without ``classes`` and ``class-map``)."""
    if classes is None and class_map is None:
        return images
    return relabel(images, plan_labels(images.classes, classes, class_map, where=images.name))
