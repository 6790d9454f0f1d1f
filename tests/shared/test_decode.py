"""Hostile and odd images: what a site trains on, what it skips and reports, and what decoding costs in memory."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from fedlens.shared.config import FedConfig, config_help
from fedlens.shared.data import load_image_folder
from fedlens.shared.errors import ConfigError
from fedlens.shared.models import ImageDecodeError, _transform, decode_image, read_image

from .hostile_files import BIG, BOMB, big_jpeg, bomb_png, hostile_folder


def test_a_hostile_folder_trains_on_what_is_usable_and_reports_the_rest_in_one_line(tmp_path, caplog):
    expected = hostile_folder(tmp_path / "site")
    with caplog.at_level(logging.INFO, logger="fedlens"):
        images, report = load_image_folder(tmp_path / "site", image_size=16)

    assert {s.path.name: s.category for s in report.skipped_files} == {k: v for k, v in expected.items() if v}
    assert report.read == len(images) == 7 and report.multi_frame == 2  # the animated GIF and the TIFF
    assert report.reasons() == {"not an image": 2, "empty file": 1, "decompression bomb": 1, "truncated": 1}
    lines = [r for r in caplog.records if r.name.startswith("fedlens") and "skipped" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING  # one summary line, not one line per file
    assert "5 skipped (2 not an image, 1 empty file, 1 decompression bomb, 1 truncated" in lines[0].getMessage()
    assert "first frame" in lines[0].getMessage()


def test_odd_files_decode_to_the_pixels_they_show(tmp_path):
    hostile_folder(tmp_path / "site", big=False)
    a, b = tmp_path / "site" / "a", tmp_path / "site" / "b"
    upright = decode_image(a / "exif_rotated.jpg")
    assert upright.shape == (1, 40, 20) and upright[0, :20].mean() > 200 and upright[0, 20:].mean() < 50
    assert decode_image(b / "animated.gif").min() == 255  # the first (white) frame only
    assert decode_image(a / "multipage.tif").min() == 255  # the first (white) page only
    red = decode_image(b / "cmyk.jpg")
    assert red.shape == (3, 16, 16) and red[0].mean() > 230 and red[1:].mean() < 25
    palette = decode_image(a / "palette_transparent.png")
    assert palette.shape == (3, 16, 16) and palette[:, :, :8].max() == 0  # transparent: black, not the palette's red
    assert palette[1, :, 8:].min() == 255 and palette[[0, 2], :, 8:].max() == 0  # opaque green stays green
    assert decode_image(b / "grey16.png").max() == 200  # 51400 / 257
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(b / "truncated.jpg")


def test_large_files_are_decoded_at_a_reduced_scale_close_to_a_full_decode(tmp_path):
    y, x = np.mgrid[0:1200, 0:1600]
    photo = np.stack([x * 255 // 1600, y * 255 // 1200, (x + y) * 255 // 2800], axis=-1).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "p.jpg", quality=95)
    Image.fromarray(photo).save(tmp_path / "p.png")
    for name in ("p.jpg", "p.png"):
        reduced = read_image(tmp_path / name, size=32).pixels.astype(int)
        full = read_image(tmp_path / name).pixels
        reference = _transform._resize_center_crop(_transform.torch.from_numpy(full)[None], 32)[0].numpy().astype(int)
        assert reduced.shape == (3, 32, 32) and np.abs(reduced - reference).mean() < 2  # same picture, within rounding


_MEASURE = textwrap.dedent(
    """
    import json, re, sys
    from fedlens.shared.models import ImageDecodeError, decode_image

    def status(key):
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

    def peak(call):
        open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current size
        before = status("VmRSS")
        try:
            call()
        except ImageDecodeError:
            pass
        return status("VmHWM") - before

    big, bomb = sys.argv[1], sys.argv[2]
    decode_image(big, size=8)  # warm-up: first-call allocations of PIL and torch are not the decode's
    result = {
        "reduced": peak(lambda: decode_image(big, size=96)),
        "bomb": peak(lambda: decode_image(bomb, size=96)),
        "full": peak(lambda: decode_image(big)),
    }
    print(json.dumps(result))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's memory high-water mark from /proc")
def test_a_50_megapixel_photo_and_a_bomb_stay_within_a_small_memory_bound(tmp_path):
    big_jpeg(tmp_path / "big.jpg")
    bomb_png(tmp_path / "bomb.png")
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tmp_path / "big.jpg"), str(tmp_path / "bomb.png")],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    peak = json.loads(out.stdout.strip().splitlines()[-1])
    full_rgb = BIG[0] * BIG[1] * 3  # 150 MB: what holding the photo at its stored size needs
    assert peak["full"] > full_rgb * 0.9  # the measurement sees a full decode
    assert peak["reduced"] < 40 * 2**20  # decoded at 1/8 scale: about 2.3 MB of pixels
    assert peak["bomb"] < 8 * 2**20  # refused from its header; a decode would need BOMB[0] * BOMB[1] bytes
    assert BOMB[0] * BOMB[1] > 100 * peak["bomb"]


def test_the_site_limit_replaces_pils_own_without_changing_it(tmp_path, monkeypatch):
    Image.new("L", (24, 24), 9).save(tmp_path / "x.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL alone would refuse 576 px
    assert read_image(tmp_path / "x.png", max_pixels=1000).pixels.max() == 9
    assert Image.MAX_IMAGE_PIXELS == 100
    with pytest.raises(ImageDecodeError, match="decompression bomb: 576 px > max-image-pixels 575"):
        read_image(tmp_path / "x.png", max_pixels=575)


def test_max_image_pixels_is_a_validated_documented_key():
    assert FedConfig().max_image_pixels == 100_000_000
    assert FedConfig.from_mapping({"max-image-pixels": 5_000}).max_image_pixels == 5_000
    with pytest.raises(ConfigError, match="max-image-pixels"):
        FedConfig.from_mapping({"max-image-pixels": 0})
    assert "max-image-pixels" in config_help()


def test_only_the_named_image_formats_are_opened(tmp_path):
    # PIL knows dozens of formats (EPS would run Ghostscript); a site's folder gets only the ones fedlens names.
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png", format="PPM")
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_image(tmp_path / "x.png")
