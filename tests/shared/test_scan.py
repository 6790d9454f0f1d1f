"""scan_folder: header facts and hashes per file, and the same skip decisions as the loader."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from fedlens.shared.data import FolderScan, ImageFacts, SkippedFile, load_image_folder, scan_folder
from fedlens.shared.errors import DataError

from .hostile_files import hostile_folder

MAX = 100_000_000


def test_scan_records_header_facts_and_the_bytes_hash(image_folder):
    shutil.copy(image_folder / "alpha" / "alpha_0.png", image_folder / "beta" / "copy_of_alpha_0.png")
    scan = scan_folder(image_folder, max_pixels=MAX)
    assert isinstance(scan, FolderScan) and scan.root == image_folder and scan.skipped == ()
    assert len(scan.images) == 37 and all(isinstance(f, ImageFacts) for f in scan.images)
    assert [f.label_dir for f in scan.images].count("beta") == 13
    assert {(f.width, f.height, f.frames) for f in scan.images} == {(24, 24, 1)}
    assert {f.mode for f in scan.images} == {"L", "RGB", "RGBA", "P", "I;16"}
    assert {f.bit_depth for f in scan.images if f.mode == "I;16"} == {16}
    assert {f.bit_depth for f in scan.images if f.mode != "I;16"} == {8}
    by_name = {f.path.name: f for f in scan.images}
    original = by_name["alpha_0.png"]
    assert original.sha256 == hashlib.sha256(original.path.read_bytes()).hexdigest()
    assert by_name["copy_of_alpha_0.png"].sha256 == original.sha256  # exact duplicates are visible
    assert by_name["alpha_1.png"].sha256 != original.sha256


def test_scan_and_loader_agree_on_every_file(tmp_path):
    expected = hostile_folder(tmp_path / "site", big=False)
    scan = scan_folder(tmp_path / "site", max_pixels=MAX)
    images, report = load_image_folder(tmp_path / "site", image_size=16, max_pixels=MAX)

    assert all(isinstance(s, SkippedFile) for s in scan.skipped)
    assert {s.path.name: s.category for s in scan.skipped} == {k: v for k, v in expected.items() if v}
    assert [(s.path, s.reason) for s in scan.skipped] == [(s.path, s.reason) for s in report.skipped_files]
    assert {f.path.name for f in scan.images} == {k for k, v in expected.items() if v is None}
    # Same files, same order: the scan's class folders are the loader's labels.
    assert [images.classes.index(f.label_dir) for f in scan.images] == images.labels.tolist()
    assert report.read == len(scan.images) == len(images)


def test_scan_applies_the_sites_pixel_limit_as_the_loader_does(image_folder):
    scan = scan_folder(image_folder, max_pixels=24 * 24 - 1)
    assert scan.images == () and len(scan.skipped) == 36
    assert {s.reason for s in scan.skipped} == {"decompression bomb: 576 px > max-image-pixels 575"}
    with pytest.raises(DataError, match="0 readable images.*36 decompression bomb"):
        load_image_folder(image_folder, image_size=16, max_pixels=24 * 24 - 1)


def test_scan_refuses_a_missing_or_flat_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_folder(tmp_path / "nope", max_pixels=MAX)
    (tmp_path / "loose.png").write_bytes(b"")
    with pytest.raises(DataError, match="class sub-folders"):
        scan_folder(tmp_path, max_pixels=MAX)


def test_hidden_files_and_folders_are_neither_used_nor_reported(image_folder):
    (image_folder / "alpha" / ".DS_Store").write_bytes(b"\x00\x01")
    (image_folder / "alpha" / ".thumbs").mkdir()
    shutil.copy(image_folder / "alpha" / "alpha_0.png", image_folder / "alpha" / ".thumbs" / "t.png")
    scan = scan_folder(image_folder, max_pixels=MAX)
    assert len(scan.images) == 36 and scan.skipped == ()
