"""DICOM input: the display chain (window, VOI, MONOCHROME1), frames, compression, broken files, and no PHI."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, SecondaryCaptureImageStorage, generate_uid

from fedlens.shared.config import FedConfig
from fedlens.shared.data import load_dataset, load_image_folder, scan_folder
from fedlens.shared.errors import DataError
from fedlens.shared.models import ImageDecodeError, read_image

# Identifiers no log line, warning or reason may ever show.
PHI = ("DOE^JANE", "PHI-12345", "19450203", "SECRET-VALUE")
MAX = 100_000_000


def dicom(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits: int = 12,
    **elements: object,
) -> Dataset:
    """A secondary-capture dataset holding ``pixels`` ([rows, cols] or [frames, rows, cols]; uint16 or uint8 RGB)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PHI[0], PHI[1], PHI[2]
    colour = photometric == "RGB"
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if colour or bits <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    if colour:
        ds.PlanarConfiguration = 0
    if pixels.ndim == (4 if colour else 3):
        ds.NumberOfFrames = pixels.shape[0]
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype(np.uint8 if ds.BitsAllocated == 8 else np.uint16).tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def gradient(rows: int = 32, cols: int = 128) -> np.ndarray:
    """12-bit values rising left to right, 0 .. 4095."""
    return np.tile(np.linspace(0, 4095, cols).round().astype(np.uint16), (rows, 1))


def test_window_centre_and_width_are_applied(tmp_path):
    data = gradient()
    out = read_image(save(dicom(data, WindowCenter=1024, WindowWidth=1024), tmp_path / "w.dcm")).pixels[0]
    # DICOM PS3.3 C.11.2.1.2.1, LINEAR: the window [512, 1536] spans black to white.
    x = data.astype(np.float64)
    expected = np.clip((x - 1023.5) / 1023 + 0.5, 0, 1) * 255
    assert out.dtype == np.uint8 and out.shape == data.shape
    assert np.abs(out - expected).max() <= 1
    assert out[:, data[0] < 500].max() == 0 and out[:, data[0] > 1540].min() == 255


def test_monochrome1_is_shown_inverted(tmp_path):
    data = gradient()
    m2 = read_image(save(dicom(data, WindowCenter=2048, WindowWidth=4096), tmp_path / "m2.dcm")).pixels
    m1 = read_image(save(dicom(data, photometric="MONOCHROME1", WindowCenter=2048, WindowWidth=4096), tmp_path / "m1.dcm")).pixels
    assert np.array_equal(m1, 255 - m2)
    assert m2[0, 0, 0] == 0 and m1[0, 0, 0] == 255  # low values are white in MONOCHROME1


def test_rescale_then_window_as_for_ct(tmp_path):
    stored = np.array([[0, 1064, 2000, 824, 1264]], dtype=np.uint16)  # -1024, 40, 976, -200, 240 HU
    ds = dicom(stored, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    out = read_image(save(ds, tmp_path / "ct.dcm")).pixels[0, 0]
    assert out[0] == 0 and out[2] == 255  # air black, bone white
    assert abs(int(out[1]) - 128) <= 1  # the window's centre is mid grey
    assert out[3] == 0 and out[4] == 255  # the window's edges


def test_without_a_window_deep_data_is_stretched_and_8_bit_kept(tmp_path):
    deep = np.array([[100, 350, 600]], dtype=np.uint16)
    assert read_image(save(dicom(deep), tmp_path / "d.dcm")).pixels[0, 0].tolist() == [0, 128, 255]
    shallow = np.array([[10, 20, 30]], dtype=np.uint8)
    assert read_image(save(dicom(shallow, bits=8), tmp_path / "s.dcm")).pixels[0, 0].tolist() == [10, 20, 30]


def test_rgb_dicom_is_colour(tmp_path):
    rgb = np.zeros((4, 6, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    out = read_image(save(dicom(rgb, photometric="RGB", bits=8), tmp_path / "c.dcm"))
    assert out.info.mode == "DICOM RGB" and out.pixels.shape == (3, 4, 6)
    assert out.pixels[0].min() == 200 and out.pixels[1:].max() == 0


def test_multi_frame_gives_its_first_frame_and_one_counted_note(tmp_path, caplog):
    frames = np.stack([np.full((8, 8), v, dtype=np.uint16) for v in (4095, 0, 2000)])
    for i in range(2):
        save(dicom(frames, WindowCenter=2048, WindowWidth=4096), tmp_path / "site" / "cls" / f"cine{i}.dcm")
    save(dicom(gradient(8, 8)), tmp_path / "site" / "cls" / "single.dcm")
    decoded = read_image(tmp_path / "site" / "cls" / "cine0.dcm")
    assert decoded.info.frames == 3 and decoded.pixels.min() == 255  # the first frame, white
    with caplog.at_level(logging.INFO, logger="fedlens"):
        images, report = load_image_folder(tmp_path / "site", image_size=8)
    assert len(images) == 3 and report.multi_frame == 2
    notes = [r.getMessage() for r in caplog.records if "first frame" in r.getMessage()]
    assert len(notes) == 1 and "2 multi-frame file(s)" in notes[0]


def jpeg_lossless(src: Path, dst: Path) -> None:
    """Re-encode ``src`` as JPEG Lossless (process 14, SV1), the common PACS export, with gdcm."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()


@pytest.mark.parametrize("syntax", ["rle", "jpeg2000-lossless", "jpeg-lossless"])
def test_compressed_files_decode_to_the_same_pixels(tmp_path, syntax):
    ds = dicom(gradient(), WindowCenter=1024, WindowWidth=2048)
    plain = save(ds, tmp_path / "plain.dcm")
    packed = tmp_path / f"{syntax}.dcm"
    if syntax == "jpeg-lossless":
        jpeg_lossless(plain, packed)
    else:
        ds.compress(RLELossless if syntax == "rle" else JPEG2000Lossless)
        save(ds, packed)
    assert np.array_equal(read_image(packed).pixels, read_image(plain).pixels)


def broken_and_odd_folder(root: Path) -> dict[str, str | None]:
    """File name -> expected skip category (None = used), for a folder of DICOM files as a PACS export leaves them."""
    cls = root / "cls"
    good = dicom(gradient(16, 16), WindowCenter=2048, WindowWidth=4096)
    save(good, cls / "good.dcm")
    save(good, cls / "1.2.840.99999.1.17")  # no extension: found by its DICM marker
    whole = (cls / "good.dcm").read_bytes()
    (cls / "truncated.dcm").write_bytes(whole[: len(whole) - 300])
    (cls / "header_cut.dcm").write_bytes(whole[:200])
    (cls / "garbage.dcm").write_bytes(b"\x00\x01not dicom at all" * 20)
    report = dicom(gradient(4, 4))
    del report.PixelData  # e.g. a structured report or a presentation state
    save(report, cls / "no_pixels.dcm")
    # Invalid values in elements fedlens reads: pydicom's own messages about them quote the value.
    save(dicom(gradient(16, 16), WindowCenter="123456789012", WindowWidth="800"), cls / "odd_window.dcm")
    odd = (cls / "odd_window.dcm").read_bytes()
    (cls / "odd_window.dcm").write_bytes(odd.replace(b"123456789012", PHI[3].encode()))
    (cls / "odd_photometric.dcm").write_bytes(whole.replace(b"MONOCHROME2 ", PHI[3].encode()))
    # A vendor's private compression: the file meta names a transfer syntax pydicom does not know.
    private = whole.replace(ExplicitVRLittleEndian.encode() + b"\x00", b"1.2.826.0.1.3680.99\x00", 1)
    assert private != whole
    (cls / "private_syntax.dcm").write_bytes(private)
    (cls / "IM0001").write_bytes(b"not an image and not DICOM")
    return {
        "good.dcm": None,
        "1.2.840.99999.1.17": None,
        "odd_window.dcm": None,
        "truncated.dcm": "truncated",
        "header_cut.dcm": "damaged",
        "garbage.dcm": "damaged",
        "no_pixels.dcm": "not an image",
        "private_syntax.dcm": "unsupported",
        "odd_photometric.dcm": "unsupported",
        "IM0001": "not an image",
    }


def test_broken_dicom_files_are_skipped_with_reasons_and_no_patient_data_anywhere(tmp_path, caplog):
    expected = broken_and_odd_folder(tmp_path / "site")
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images, report = load_image_folder(tmp_path / "site", image_size=16)
        scan = scan_folder(tmp_path / "site", max_pixels=MAX)
        with pytest.raises(ImageDecodeError) as err:
            read_image(tmp_path / "site" / "cls" / "truncated.dcm")
    assert {s.path.name: s.category for s in report.skipped_files} == {k: v for k, v in expected.items() if v}
    assert {f.path.name for f in scan.images} == {k for k, v in expected.items() if v is None} and len(images) == 3
    assert [(s.path, s.reason) for s in scan.skipped] == [(s.path, s.reason) for s in report.skipped_files]
    said = "\n".join([caplog.text, str(err.value), report.summary(), *(s.reason for s in scan.skipped), *(str(w.message) for w in caught)])
    assert "truncated" in said and "DICOM" in said
    for identifier in PHI:
        assert identifier not in said


def test_the_pixel_limit_applies_to_dicom_frames(tmp_path):
    path = save(dicom(gradient(64, 64)), tmp_path / "big.dcm")
    with pytest.raises(ImageDecodeError, match="decompression bomb: 4096 px > max-image-pixels 4095"):
        read_image(path, max_pixels=4095)


def test_scan_reports_dicom_facts(tmp_path):
    frames = np.stack([gradient(8, 12)] * 3)
    save(dicom(frames, photometric="MONOCHROME1"), tmp_path / "site" / "cls" / "a.dcm")
    (facts,) = scan_folder(tmp_path / "site", max_pixels=MAX).images
    assert (facts.width, facts.height, facts.mode, facts.bit_depth, facts.frames) == (12, 8, "DICOM MONOCHROME1", 12, 3)


def test_folder_simulation_reads_a_dicom_folder(tmp_path):
    rng = np.random.default_rng(0)
    for c, name in enumerate(["effusion", "normal"]):
        for i in range(6):
            data = (rng.integers(0, 400, (24, 24)) + 1800 * c).astype(np.uint16)
            suffix = ".dcm" if i % 2 else ""
            save(dicom(data, photometric="MONOCHROME1" if i % 3 == 0 else "MONOCHROME2"), tmp_path / "pacs" / name / f"img{i}{suffix}")
    cfg = FedConfig.from_mapping({"dataset": "folder", "data-path": str(tmp_path / "pacs"), "image-size": 16, "test-fraction": 0.25})
    train, test = load_dataset(cfg)
    assert train.classes == ("effusion", "normal") and len(train) + len(test) == 12
    assert train.images.shape[1:] == (1, 16, 16)


def test_a_folder_of_only_broken_dicom_is_a_clear_error(tmp_path):
    (tmp_path / "site" / "cls").mkdir(parents=True)
    (tmp_path / "site" / "cls" / "a.dcm").write_bytes(b"\x00" * 300)
    with pytest.raises(DataError, match=r"0 readable images.*1 damaged.*a.dcm: damaged: no readable DICOM header"):
        load_image_folder(tmp_path / "site", image_size=16)
