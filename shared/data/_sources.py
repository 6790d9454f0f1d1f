"""Readers for the data sources fedlens supports: image folders, Fashion-MNIST, MedMNIST .npz."""

from __future__ import annotations

import gzip
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..config import DEFAULT_MAX_IMAGE_PIXELS
from ..errors import DataError
from ..models import IMAGE_SUFFIXES, Decoded, ImageTransform, read_image
from ._imageset import ImageSet, LoadReport
from .labels import ClassMap, plan_labels
from .scan import SkippedFile, class_folders, read_file, walk_folder

__all__ = [
    "load_image_folder",
    "load_fashion_mnist",
    "load_npz",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIRS",
    "IMAGE_SUFFIXES",
]

_log = logging.getLogger(f"fedlens.{__name__}")

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Debian's dataset-fashion-mnist package installs the original idx files here.
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)


def load_image_folder(
    root: str | Path,
    *,
    transform: ImageTransform | None = None,
    image_size: int | None = None,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    classes: Sequence[str] | None = None,
    class_map: ClassMap | None = None,
    where: str | None = None,
) -> tuple[ImageSet, LoadReport]:
    """Read an ImageFolder layout: ``root/<class>/<image>``, DICOM files included.

    Every file is decoded by ``transform`` (:meth:`ImageTransform.read`: upright, DICOM
    through its display chain, then shorter side to the image size and
    centre-cropped), so the set holds the pixels the model will see, before
    normalisation. Files that cannot be used (empty, not an image, decompression
    bombs over ``max_pixels``, truncated, damaged, unsupported DICOM) are skipped
    and counted per reason in the report, which is logged as one line; multi-frame
    files contribute their first frame. The same decision is made by
    :func:`~fedlens.shared.data.scan_folder`.

    The class folders are mapped onto ``classes`` by name (:func:`plan_labels`), so
    label ``i`` is ``classes[i]`` whatever folders this copy of the data has. Folders
    the class map ignores are not read.

    Parameters
    ----------
    root : path-like
        The folder holding one sub-folder per class.
    transform : ImageTransform
        The backbone's preprocessing (``get_backbone(name).transforms(image_size=...)``).
    image_size : int
        Instead of ``transform``: the same decoding and resize policy at this size.
        Decoding does not depend on the backbone (normalisation comes per batch), so
        both give the same images; pass exactly one of the two.
    name : str, optional
        Name of the set (default: the folder's name).
    max_pixels : int
        The config's ``max-image-pixels``.
    classes : sequence of str, optional
        The label set (the federation's classes, or a model's). Default: the class
        folders' own names (after the class map), sorted.
    class_map : ClassMap, optional
        The data owner's renames and ``ignore`` lines.
    where : str, optional
        How messages name this data (default: ``data folder ROOT``).

    Raises
    ------
    LabelMismatch
        If a class folder is not in ``classes`` and not mapped or ignored, or two
        land on one class without the class map saying so.
    DataError
        If ``root`` is missing, has no class folders, or holds no usable image.
    """
    if (transform is None) == (image_size is None):
        raise TypeError("load_image_folder takes exactly one of `transform` and `image_size`")
    size = transform.image_size if transform is not None else int(image_size)  # type: ignore[arg-type]

    def read(path: Path) -> Decoded:
        if transform is not None:
            return transform.read(path, max_pixels=max_pixels)
        return read_image(path, size=size, max_pixels=max_pixels)

    root = Path(root)
    report = LoadReport(source=str(root))
    folders = class_folders(root)
    plan = plan_labels(folders, classes, class_map, where=where or f"data folder {root}")
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    label_of = dict(plan.assigned)
    for label_dir, path in walk_folder(root, list(label_of)):
        result = read_file(path, read)
        if isinstance(result, SkippedFile):
            report.skipped_files.append(result)
            continue
        arrays.append(result.pixels)
        labels.append(label_of[label_dir])
        report.multi_frame += result.info.frames > 1
    report.read = len(arrays)
    if not arrays:
        detail = report.summary() if report.skipped else f"{root}: the class folders are empty"
        raise DataError(f"data folder {root} has 0 readable images ({detail})")
    if report.skipped:
        _log.warning("%s", report.summary())
    elif report.multi_frame:
        _log.info("%s", report.summary())
    channels = max(a.shape[0] for a in arrays)
    stacked = np.stack([np.repeat(a, channels // a.shape[0], axis=0) for a in arrays])
    images = ImageSet(torch.from_numpy(stacked), torch.tensor(labels, dtype=torch.int64), plan.classes, name or root.name)
    _check_classes(images, str(root))
    return images, report


def _check_classes(images: ImageSet, where: str) -> None:
    empty = [c for c, n in zip(images.classes, images.class_counts()) if n == 0]
    if empty:
        _log.warning("%s: classes with no readable image: %s", where, ", ".join(empty))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an idx file")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise DataError(f"{path}: unsupported idx element type {dtype_code:#x} (expected unsigned bytes)")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {body.size}")
    return body.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem, folder / "FashionMNIST" / "raw" / stem):
        if candidate.is_file():
            return candidate
    return None


def load_fashion_mnist(data_path: str | None = None, *, download_root: str | None = None) -> tuple[ImageSet, ImageSet]:
    """Fashion-MNIST as ``(train, test)`` (60,000 and 10,000 grey 28 x 28 images).

    Looked up in ``data_path`` when given, else in Debian's ``dataset-fashion-mnist``
    location; when absent there, torchvision downloads it into ``download_root``.

    Raises
    ------
    DataError
        If the files are nowhere and cannot be downloaded.
    """
    folders = [Path(data_path)] if data_path else [Path(d) for d in FASHION_MNIST_DIRS]
    if download_root and not data_path:
        folders.append(Path(download_root))
    for folder in folders:
        stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
        paths = [_find_idx(folder, s) for s in stems]
        if all(p is not None for p in paths):
            arrays = [_read_idx(p) for p in paths]  # type: ignore[arg-type]
            _log.debug("Fashion-MNIST read from %s", folder)
            return _fmnist_set(arrays[0], arrays[1], "fashion-mnist-train"), _fmnist_set(arrays[2], arrays[3], "fashion-mnist-test")
    if data_path:
        raise DataError(f"Fashion-MNIST idx files (train-images-idx3-ubyte[.gz] and three more) are not in {data_path}")
    if download_root is None:
        raise DataError(_FMNIST_HELP)
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(download_root, train=True, download=True)
        FashionMNIST(download_root, train=False, download=True)
    except Exception as exc:  # URLError, RuntimeError from torchvision's downloader
        raise DataError(f"{_FMNIST_HELP} The download attempt failed: {type(exc).__name__}: {exc}") from exc
    return load_fashion_mnist(str(Path(download_root) / "FashionMNIST" / "raw"))


_FMNIST_HELP = (
    "Fashion-MNIST is not on this machine. Install it with `apt-get install dataset-fashion-mnist` "
    "(Debian/Ubuntu), point `data-path` at a folder holding the four idx files, or run where "
    "torchvision can download it."
)


def _fmnist_set(images: np.ndarray, labels: np.ndarray, name: str) -> ImageSet:
    return ImageSet(
        torch.from_numpy(images.copy())[:, None],
        torch.from_numpy(labels.astype(np.int64)),
        FASHION_MNIST_CLASSES,
        name,
    )


def load_npz(path: str | Path) -> ImageSet:
    """Read a MedMNIST-format ``.npz`` (``{train,val,test}_{images,labels}``), all splits pooled.

    Images may be ``[N, H, W]`` (grey) or ``[N, H, W, 3]``; labels ``[N]`` or ``[N, 1]``.
    Class names come from a ``classes`` array when present, else ``"0" .. "K-1"``.

    Raises
    ------
    DataError
        For a missing or unreadable file, missing keys, multi-label targets or
        mismatched lengths.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"npz file {path} does not exist")
    try:
        # allow_pickle=False: an .npz may carry pickled objects, which could run code.
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as a numpy .npz file ({exc})") from exc
    splits = [s for s in ("train", "val", "test") if f"{s}_images" in arrays]
    if not splits:
        raise DataError(
            f"{path} has no '<split>_images' arrays (found: {', '.join(sorted(arrays)) or 'nothing'}); expected MedMNIST layout"
        )
    images, labels = [], []
    for split in splits:
        x, key = arrays[f"{split}_images"], f"{split}_labels"
        if key not in arrays:
            raise DataError(f"{path} has {split}_images but no {key}")
        y = arrays[key]
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise DataError(f"{path}: {key} has shape {y.shape}; multi-label data sets are not supported")
        if len(x) != len(y):
            raise DataError(f"{path}: {split} has {len(x)} images but {len(y)} labels")
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] in (1, 3):
            x = x.transpose(0, 3, 1, 2)
        else:
            raise DataError(f"{path}: {split}_images has shape {x.shape}; expected [N, H, W] or [N, H, W, 3]")
        if x.dtype != np.uint8:
            raise DataError(f"{path}: {split}_images has dtype {x.dtype}; expected uint8")
        images.append(x)
        labels.append(y.astype(np.int64))
    y_all = np.concatenate(labels)
    if y_all.min() < 0:
        raise DataError(f"{path}: labels must be non-negative integers")
    if "classes" in arrays:
        classes = tuple(str(c) for c in arrays["classes"].tolist())
    else:
        classes = tuple(str(i) for i in range(int(y_all.max()) + 1))
    if y_all.max() >= len(classes):
        raise DataError(f"{path}: label {int(y_all.max())} but only {len(classes)} class names")
    return ImageSet(torch.from_numpy(np.ascontiguousarray(np.concatenate(images))), torch.from_numpy(y_all), classes, path.stem)
