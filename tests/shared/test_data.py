import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from fedlens.shared.config import FedConfig
from fedlens.shared.data import (
    ImageSet,
    ImageTransform,
    decode_image,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    load_npz,
    parse_augment,
    stratified_split,
)
from fedlens.shared.data._decode import ImageDecodeError
from fedlens.shared.errors import DataError
from fedlens.shared.models import get_backbone


def test_image_folder_reads_every_mode(image_folder):
    images, report = load_image_folder(image_folder, image_size=16)
    assert images.classes == ("alpha", "beta", "gamma")
    assert len(images) == 36 and report.read == 36 and report.skipped == 0
    assert images.images.shape == (36, 3, 16, 16)  # mixed grey/colour becomes 3 channels
    assert images.class_counts() == [12, 12, 12]
    # 16-bit and 8-bit versions of the same pattern decode to similar intensities.
    assert images.images.float().mean() > 20


def test_bad_files_are_skipped_counted_and_reported(image_folder):
    (image_folder / "alpha" / "empty.png").write_bytes(b"")
    (image_folder / "alpha" / "notes.txt").write_text("hello")
    (image_folder / "beta" / "fake.png").write_bytes(b"definitely not a png")
    good = (image_folder / "gamma" / "gamma_0.png").read_bytes()
    (image_folder / "gamma" / "truncated.png").write_bytes(good[: len(good) // 2])
    images, report = load_image_folder(image_folder, image_size=16)
    assert len(images) == 36
    assert report.skipped == 4
    text = " ".join(report.errors)
    assert "empty.png" in text and "notes.txt" in text and "fake.png" in text and "truncated.png" in text


def test_folder_without_readable_images_names_the_folder_and_errors(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "a.png").write_bytes(b"")
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path, image_size=16)
    assert str(tmp_path) in str(err.value) and "a.png" in str(err.value) and "0 readable" in str(err.value)


def test_missing_or_flat_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nope", image_size=16)
    Image.new("L", (8, 8)).save(tmp_path / "loose.png")
    with pytest.raises(DataError, match="class sub-folders"):
        load_image_folder(tmp_path, image_size=16)


@pytest.mark.parametrize("mode, channels", [("L", 1), ("RGB", 3), ("RGBA", 3), ("P", 3), ("I;16", 1), ("1", 1), ("LA", 1)])
def test_decode_image_modes(tmp_path, mode, channels):
    path = tmp_path / f"x_{mode.replace(';', '')}.png"
    base = Image.new("RGB", (10, 6), (200, 100, 50))
    if mode == "I;16":
        img = Image.fromarray(np.full((6, 10), 51400, dtype=np.uint16))
    else:
        img = base.convert(mode)
    img.save(path)
    arr = decode_image(path, size=8)
    assert arr.dtype == np.uint8 and arr.shape == (channels, 8, 8)
    if mode == "I;16":
        assert arr.max() == 200  # 51400 / 257


def test_decode_jpeg_and_errors(tmp_path):
    Image.new("RGB", (12, 12), (10, 20, 30)).save(tmp_path / "a.jpg")
    assert decode_image(tmp_path / "a.jpg").shape == (3, 12, 12)
    (tmp_path / "z.png").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(tmp_path / "z.png")


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_reader(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 8)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    train, test = load_fashion_mnist(str(tmp_path))
    assert train.images.shape == (20, 1, 28, 28) and len(test) == 8
    assert train.classes[0] == "T-shirt/top" and train.labels.tolist()[:3] == [0, 1, 2]


def test_fashion_mnist_missing_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="idx files"):
        load_fashion_mnist(str(tmp_path))


def _npz(path, n=30, rgb=False):
    rng = np.random.default_rng(0)
    shape = (n, 28, 28, 3) if rgb else (n, 28, 28)
    np.savez(
        path,
        train_images=rng.integers(0, 255, shape, dtype=np.uint8),
        train_labels=(np.arange(n) % 3)[:, None],
        test_images=rng.integers(0, 255, (9, *shape[1:]), dtype=np.uint8),
        test_labels=(np.arange(9) % 3)[:, None],
    )


@pytest.mark.parametrize("rgb", [False, True])
def test_npz_loader_pools_splits(tmp_path, rgb):
    _npz(tmp_path / "m.npz", rgb=rgb)
    data = load_npz(tmp_path / "m.npz")
    assert len(data) == 39 and data.images.shape[1] == (3 if rgb else 1)
    assert data.classes == ("0", "1", "2")


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match="MedMNIST"):
        load_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "multi.npz", train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.zeros((2, 3)))
    with pytest.raises(DataError, match="multi-label"):
        load_npz(tmp_path / "multi.npz")
    (tmp_path / "junk.npz").write_bytes(b"nope")
    with pytest.raises(DataError, match="cannot read"):
        load_npz(tmp_path / "junk.npz")


def test_folder_dataset_keeps_a_stratified_test_fraction(image_folder):
    cfg = FedConfig.from_mapping({"dataset": "folder", "data-path": str(image_folder), "test-fraction": 0.25, "image-size": 16})
    train, test = load_dataset(cfg)
    assert len(train) + len(test) == 36
    assert test.class_counts() == [3, 3, 3]


def test_stratified_split_is_reproducible_and_disjoint():
    labels = np.repeat(np.arange(4), 25)
    a_rest, a_held = stratified_split(labels, 0.2, seed=3)
    b_rest, b_held = stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(a_held, b_held) and not set(a_rest) & set(a_held)
    assert np.bincount(labels[a_held]).tolist() == [5, 5, 5, 5]


def test_transform_makes_normalised_rgb_and_augments_only_in_training():
    prep = get_backbone("efficientnet-lite0").preprocessing
    grey = torch.randint(0, 255, (4, 1, 28, 28), dtype=torch.uint8)
    plain = ImageTransform(image_size=32, preprocessing=prep)
    out = plain(grey)
    assert out.shape == (4, 3, 32, 32)
    assert torch.allclose(out[:, 0], out[:, 1])
    aug = ImageTransform(image_size=32, preprocessing=prep, augment=parse_augment("flip,crop,color"))
    assert torch.equal(aug(grey, train=False), out)
    g = torch.Generator().manual_seed(0)
    assert not torch.equal(aug(grey, train=True, generator=g), out)


def test_imageset_validates_shapes():
    with pytest.raises(ValueError):
        ImageSet(torch.zeros(2, 2, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), ("a",), "x")
