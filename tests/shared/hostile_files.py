"""Odd and hostile image files as real sites have them, written by the tests themselves."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Stored size of the big photo: 50 megapixels, as a recent phone or camera takes them.
BIG = (8660, 5774)
# What the bomb's header claims: 400 megapixels, over the default max-image-pixels.
BOMB = (20000, 20000)


def bomb_png(path: Path, size: tuple[int, int] = BOMB) -> None:
    """A tiny PNG whose header claims ``size``: decoding it would allocate gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", size[0], size[1], 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def big_jpeg(path: Path, size: tuple[int, int] = BIG) -> None:
    """A solid-colour photo of ``size`` (compresses to under a megabyte; a full decode needs size x 3 bytes)."""
    Image.new("RGB", size, (120, 160, 200)).save(path, quality=50)


def exif_rotated_jpeg(path: Path) -> None:
    """Stored landscape 40 x 20, bright left half, with EXIF 'rotate 90 clockwise to display'."""
    stored = np.zeros((20, 40), dtype=np.uint8)
    stored[:, :20] = 255
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(path, exif=exif, quality=95)


def animated_gif(path: Path) -> None:
    """Three frames: white, black, grey (the first frame is white)."""
    frames = [Image.new("L", (16, 16), v) for v in (255, 0, 128)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)


def multipage_tiff(path: Path) -> None:
    """Two pages: white, then black."""
    pages = [Image.new("L", (16, 16), 255), Image.new("L", (16, 16), 0)]
    pages[0].save(path, save_all=True, append_images=pages[1:])


def truncated_jpeg(path: Path) -> None:
    """A noisy JPEG cut in half: the header is intact, the data ends early."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG", quality=90)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def hostile_folder(root: Path, *, big: bool = True) -> dict[str, str | None]:
    """A two-class folder of odd and hostile files; returns file name -> expected skip category (None = used)."""
    a, b = root / "a", root / "b"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    expected: dict[str, str | None] = {}
    exif_rotated_jpeg(a / "exif_rotated.jpg")
    expected["exif_rotated.jpg"] = None
    if big:
        big_jpeg(a / "big_50mp.jpg")
        expected["big_50mp.jpg"] = None
    multipage_tiff(a / "multipage.tif")
    expected["multipage.tif"] = None
    palette = Image.new("P", (16, 16), 0)  # left half: index 0, red but transparent
    palette.paste(1, (8, 0, 16, 16))  # right half: index 1, opaque green
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.save(a / "palette_transparent.png", transparency=0)
    expected["palette_transparent.png"] = None
    animated_gif(b / "animated.gif")
    expected["animated.gif"] = None
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(b / "cmyk.jpg")  # red in CMYK
    expected["cmyk.jpg"] = None
    Image.fromarray(np.full((16, 16), 51400, dtype=np.uint16)).save(b / "grey16.png")
    expected["grey16.png"] = None
    bomb_png(b / "bomb.png")
    expected["bomb.png"] = "decompression bomb"
    truncated_jpeg(b / "truncated.jpg")
    expected["truncated.jpg"] = "truncated"
    (a / "not_image.jpg").write_text("this is a text file with a .jpg name\n")
    expected["not_image.jpg"] = "not an image"
    (b / "notes.txt").write_text("scanner settings\n")
    expected["notes.txt"] = "not an image"
    (a / "empty.png").write_bytes(b"")
    expected["empty.png"] = "empty file"
    return expected
