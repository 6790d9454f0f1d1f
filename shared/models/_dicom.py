"""DICOM files as upright ``uint8 [C, H, W]``: the first frame, as a radiologist's viewer would show it.

Grey images go through the file's own display chain (DICOM PS3.3 C.11): the
modality LUT or rescale slope/intercept, then the VOI LUT or the first window
centre/width (pydicom's ``apply_modality_lut`` / ``apply_voi_lut``), whose output
range is mapped to 0..255; ``MONOCHROME1`` (white = low) is inverted. Without a
VOI, 8-bit data is kept as stored and deeper data (12, 16 bit) is stretched from
its minimum to its maximum. Colour files come out as RGB (YBR is converted, a
palette applied). Window and rescale values in the functional groups of enhanced
multi-frame files are used too.

Patient data never leaves this module: only the image pixel module and transfer
syntax are read as values, pydicom's own warnings and log records (which can quote
element values) are silenced while a file is read, and every failure becomes one
of a few fixed reasons; pydicom's exception messages are never passed on.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ._decode import Decoded, ImageDecodeError, ImageInfo, check_not_empty, check_pixels

__all__ = ["decode_dicom"]

_GREY = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
_READING: contextvars.ContextVar[bool] = contextvars.ContextVar("fedlens_reading_dicom", default=False)
_SETTINGS_LOCK = threading.Lock()


class _DropWhileReading(logging.Filter):
    """Drops pydicom's log records emitted while fedlens reads a file: they can quote element values."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _READING.get()


logging.getLogger("pydicom").addFilter(_DropWhileReading())


@contextmanager
def _quiet() -> Iterator[None]:
    """No value read from the file may reach a warning or a log line while it is read."""
    from pydicom import config

    with _SETTINGS_LOCK:
        saved = config.settings.reading_validation_mode
        config.settings.reading_validation_mode = config.IGNORE
    token = _READING.set(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with np.errstate(all="ignore"):
                yield
    finally:
        _READING.reset(token)
        with _SETTINGS_LOCK:
            config.settings.reading_validation_mode = saved


def decode_dicom(path: Path, *, max_pixels: int, min_side: int | None = None) -> Decoded:
    """Decode the first frame of the DICOM file ``path`` (see the module docstring).

    ``min_side`` is accepted for symmetry with :func:`decode_photo`: a DICOM frame is
    decoded at its stored size (bounded by ``max_pixels``).

    Raises
    ------
    ImageDecodeError
        Not DICOM or a damaged header; no pixel data; a frame over ``max_pixels``;
        a colour model or compression no installed decoder reads; truncated or
        damaged pixel data. The reason never contains a value from the file.
    """
    check_not_empty(path)
    with _quiet():
        ds, pixels_at = _header(path)
        info = _info(ds)
        check_pixels(info.width, info.height, max_pixels=max_pixels)
        frame = _first_frame(path, ds, pixels_at)
        grey = _display_grey(frame, ds) if info.mode.endswith(_GREY) else _display_colour(frame, ds)
    pixels = grey[None] if grey.ndim == 2 else grey.transpose(2, 0, 1)
    return Decoded(np.require(pixels, requirements=["C", "W", "O"]), info)


def _header(path: Path) -> tuple[Any, int]:
    """The data set up to the pixel data, and the file offset where the pixel data element starts."""
    from pydicom import dcmread

    force = path.suffix.lower() in (".dcm", ".dicom")  # old files without the 128-byte preamble
    try:
        with path.open("rb") as fh:
            # Everything before the pixel data; large elements (private blobs) stay on disk.
            ds = dcmread(fh, stop_before_pixels=True, defer_size=1 << 20, force=force)
            return ds, fh.tell()
    except Exception as exc:  # a hostile header can make the parser fail in any way
        raise ImageDecodeError("damaged: no readable DICOM header (not DICOM, or cut short)") from exc


def _info(ds: Any) -> ImageInfo:
    _lift_functional_groups(ds)
    if "Rows" not in ds or "Columns" not in ds:
        if "SOPClassUID" in ds:
            raise ImageDecodeError("not an image: DICOM file without an image (e.g. a report or a presentation state)")
        raise ImageDecodeError("damaged: no readable DICOM header (not DICOM, or cut short)")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        pi = str(ds.PhotometricInterpretation).strip().upper()
        bits = int(ds.get("BitsStored") or ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ImageDecodeError("not an image: DICOM file without an image (no rows, columns or photometric interpretation)") from exc
    if rows < 1 or columns < 1:
        raise ImageDecodeError("not an image: DICOM image with no rows or columns")
    if pi not in _GREY + _COLOUR:
        raise ImageDecodeError("unsupported: DICOM photometric interpretation not supported (use MONOCHROME1/2, RGB, YBR or palette)")
    return ImageInfo(width=columns, height=rows, mode=f"DICOM {pi}", bit_depth=bits, frames=max(frames, 1))


def _lift_functional_groups(ds: Any) -> None:
    """Enhanced multi-frame files keep window and rescale in functional groups: lift the first frame's to the top."""
    for seq_name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(seq_name)
        if not seq:
            continue
        item = seq[0]
        for group, keywords in (
            ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
            ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")),
        ):
            inner = item.get(group)
            if not inner:
                continue
            for keyword in keywords:
                if keyword in inner[0] and keyword not in ds:
                    setattr(ds, keyword, inner[0].get(keyword))


def _first_frame(path: Path, ds: Any, pixels_at: int) -> np.ndarray:
    from pydicom.pixels import get_decoder, pixel_array
    from pydicom.pixels.utils import get_expected_length
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    file_meta = getattr(ds, "file_meta", None) or {}
    syntax = file_meta.get("TransferSyntaxUID")
    if not syntax:  # no file meta: the encoding pydicom found while reading
        implicit, little = ds.original_encoding
        syntax = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    syntax = UID(syntax)
    try:
        decoder = get_decoder(syntax)
    except (NotImplementedError, ValueError) as exc:
        raise ImageDecodeError(f"unsupported: DICOM transfer syntax {_syntax_name(syntax)} has no decoder in pydicom") from exc
    if not decoder.is_available:
        raise ImageDecodeError(
            f"unsupported: DICOM pixel data compressed as {_syntax_name(syntax)}; no installed decoder reads it "
            "(pip install pylibjpeg-libjpeg or python-gdcm)"
        )
    try:
        # Only the first frame is read from disk and decoded.
        return pixel_array(path, index=0, transfer_syntax_uid=syntax)
    except AttributeError as exc:
        raise ImageDecodeError("not an image: DICOM file without pixel data") from exc
    except Exception as exc:  # decoders raise anything on damaged data; their messages are never passed on
        # Uncompressed pixel data has a known length: a file too short to hold it was cut.
        short = not syntax.is_compressed and path.stat().st_size < pixels_at + 8 + get_expected_length(ds)
        if isinstance(exc, EOFError) or short:
            raise ImageDecodeError("truncated: the DICOM pixel data ends early") from exc
        raise ImageDecodeError(f"damaged: the DICOM pixel data cannot be decoded ({type(exc).__name__})") from exc


def _syntax_name(syntax: Any) -> str:
    # A transfer syntax names a compression, never a patient; unknown UIDs are shown as the UID.
    return str(syntax.name if syntax.is_transfer_syntax else syntax)


def _display_grey(frame: np.ndarray, ds: Any) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if frame.ndim == 3:  # a grey image stored with several samples: keep the first
        frame = frame[..., 0]
    has_voi = bool(ds.get("VOILUTSequence")) or ("WindowCenter" in ds and "WindowWidth" in ds)
    unsigned_8bit = int(ds.get("BitsStored") or 8) <= 8 and int(ds.get("PixelRepresentation") or 0) == 0
    out: np.ndarray | None = None
    if has_voi:
        values = apply_modality_lut(frame, ds)
        try:
            lo, hi = _voi_range(values, ds)
            if hi > lo:
                out = (apply_voi_lut(values, ds, index=0).astype(np.float32) - lo) * (255.0 / (hi - lo))
        except (ValueError, TypeError, AttributeError, IndexError, KeyError, NotImplementedError):
            out = None  # an invalid window or LUT: shown as if there were none
    if out is None and unsigned_8bit:
        out = frame.astype(np.float32)
    if out is None:
        values = apply_modality_lut(frame, ds).astype(np.float32)
        lo, hi = float(values.min()), float(values.max())
        out = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    grey = np.clip(out, 0, 255).round().astype(np.uint8)
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        grey = 255 - grey
    return grey


def _voi_range(values: np.ndarray, ds: Any) -> tuple[float, float]:
    """The output range of the file's VOI transform (so the whole window maps to 0..255)."""
    from pydicom.pixels import apply_voi_lut

    seq = ds.get("VOILUTSequence")
    if seq:
        first, count = int(seq[0].LUTDescriptor[1]), int(seq[0].LUTDescriptor[0] or 1 << 16)
        probe: np.ndarray = np.arange(first, first + count, dtype=np.int64)
    else:
        # Windowing is monotone: its extremes are the outputs for the lowest and highest input.
        probe = np.array([-1e30, 1e30], dtype=np.float64)
    mapped = apply_voi_lut(probe.astype(values.dtype) if seq else probe, ds, index=0)
    return float(np.min(mapped)), float(np.max(mapped))


def _display_colour(frame: np.ndarray, ds: Any) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    if str(ds.PhotometricInterpretation).strip().upper() == "PALETTE COLOR":
        frame = apply_color_lut(frame, ds)
        bits = 16 if frame.dtype.itemsize > 1 else 8
    else:
        bits = int(ds.get("BitsStored") or 8)
    if frame.ndim == 2:
        frame = np.repeat(frame[..., None], 3, axis=2)
    frame = frame[..., :3]
    if bits <= 8 and frame.dtype == np.uint8:
        return frame
    scale = 255.0 / (2**bits - 1)
    return np.clip(frame.astype(np.float32) * scale, 0, 255).round().astype(np.uint8)
