import gzip
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fedlens.shared.config import FedConfig
from fedlens.shared.data import (
    Augment,
    ImageSet,
    feature_cache_path,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    load_npz,
    parse_augment,
    stratified_split,
)
from fedlens.shared.errors import DataError
from fedlens.shared.models import ImageDecodeError, _transform, decode_image, get_backbone, list_backbones


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


def test_transform_makes_normalised_rgb_and_augmentation_adds_random_views():
    transform = get_backbone("efficientnet-lite0").transforms(image_size=32)
    grey = torch.randint(0, 255, (4, 1, 28, 28), dtype=torch.uint8)
    out = transform(grey)
    assert out.shape == (4, 3, 32, 32)
    assert torch.allclose(out[:, 0], out[:, 1])
    assert torch.equal(Augment().apply(grey, transform=transform), out)  # nothing on: exactly the transform
    g = torch.Generator().manual_seed(0)
    augmented = parse_augment("flip,crop,color").apply(grey, transform=transform, generator=g)
    assert augmented.shape == out.shape and not torch.equal(augmented, out)


def _transform_before_the_refactor(images, *, image_size, mean, std):
    """ImageTransform as it was when docs/benchmarks.md was measured (evaluation path)."""
    x = images.float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("backbone", list_backbones())
@pytest.mark.parametrize("image_size", [96, 28, 128, 16])
def test_fashion_mnist_batches_are_numerically_unchanged(backbone, image_size):
    # The accuracy figures in docs/benchmarks.md hold only if 28 x 28 grey batches reach
    # the model bit for bit as they did then: same kernel, same order, same normalisation.
    spec = get_backbone(backbone)
    grey = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = _transform_before_the_refactor(grey, image_size=image_size, mean=spec.preprocessing.mean, std=spec.preprocessing.std)
    transform = spec.transforms(image_size=image_size)
    assert torch.equal(transform(grey), expected)
    assert torch.equal(Augment().apply(grey, transform=transform), expected)  # the training path, no augmentation


def test_resize_policy_scales_the_shorter_side_and_crops_the_centre():
    transform = get_backbone("efficientnet-lite0").transforms(image_size=10)
    wide = torch.zeros(1, 1, 20, 40, dtype=torch.uint8)
    wide[..., :, :10] = 255  # a white band on the left quarter: outside the centre square
    wide[..., 5:15, 18:22] = 255  # a small white square in the middle
    x = transform.resize(wide.float())
    assert x.shape == (1, 1, 10, 10)
    direct = F.interpolate(wide.float(), size=(10, 20), mode="bilinear", align_corners=False, antialias=True)
    assert torch.equal(x, direct[..., :, 5:15])  # aspect kept, the centre 10 columns of 20
    assert x[..., :, 0].max() < 128 and x[..., 5, 5] > 128  # the left band is cropped away, the middle kept
    assert transform(wide).shape == (1, 3, 10, 10)


def test_files_and_arrays_go_through_the_same_policy(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    transform = get_backbone("resnet18").transforms(image_size=24)
    stored = transform.decode(tmp_path / "x.png")
    assert stored.shape == (3, 24, 24) and stored.dtype == np.uint8
    assert np.array_equal(stored, decode_image(tmp_path / "x.png", size=24))
    from_file = transform(torch.from_numpy(stored)[None])
    from_array = transform(torch.from_numpy(pixels).permute(2, 0, 1)[None].contiguous())
    # The file path rounds to uint8 once; otherwise the two are the same computation.
    assert (from_file - from_array).abs().max() <= 1.01 / 255 / min(transform.preprocessing.std)


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((20, 40), dtype=np.uint8)
    stored[:, :20] = 255  # bright left half as stored
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = decode_image(tmp_path / "phone.jpg")
    assert upright.shape == (1, 40, 20)  # portrait, as displayed
    assert upright[0, :20].mean() > 200 and upright[0, 20:].mean() < 50  # the bright half is now on top
    square = get_backbone("efficientnet-lite0").transforms(image_size=20).decode(tmp_path / "phone.jpg")
    assert square[0, :10].mean() > 200 and square[0, 10:].mean() < 50  # centre crop of the upright image


def test_transform_refuses_float_images():
    with pytest.raises(TypeError, match="uint8"):
        get_backbone("efficientnet-lite0").transforms(image_size=8)(torch.rand(1, 3, 8, 8))


def test_folder_loading_through_the_transform_or_its_size_gives_the_same_images(image_folder):
    transform = get_backbone("efficientnet-lite0").transforms(image_size=16)
    by_transform, _ = load_image_folder(image_folder, transform=transform)
    by_size, _ = load_image_folder(image_folder, image_size=16)
    assert torch.equal(by_transform.images, by_size.images)
    with pytest.raises(TypeError, match="exactly one"):
        load_image_folder(image_folder)
    with pytest.raises(TypeError, match="exactly one"):
        load_image_folder(image_folder, transform=transform, image_size=16)


def test_feature_cache_key_names_the_whole_preprocessing(tmp_path, monkeypatch):
    images = ImageSet(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1]), ("a", "b"), "tiny")

    def path(transform):
        return feature_cache_path(tmp_path, model_id="m", stop=3, transform=transform, images=images)

    lite = get_backbone("efficientnet-lite0")
    base = path(lite.transforms(image_size=32))
    assert path(lite.transforms(image_size=32)) == base  # stable
    assert path(lite.transforms(image_size=48)) != base  # image size
    assert path(get_backbone("resnet18").transforms(image_size=32)) != base  # normalisation
    monkeypatch.setattr(_transform, "_POLICY_VERSION", _transform._POLICY_VERSION + 1)
    assert path(lite.transforms(image_size=32)) != base  # a changed resize policy


def test_imageset_validates_shapes():
    with pytest.raises(ValueError):
        ImageSet(torch.zeros(2, 2, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), ("a",), "x")
