"""``fedlens predict`` and ``fedlens export`` through the real command line (in-process ``main``)."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from fedlens.ops.cli import main
from fedlens.shared.inference import EXPORT_FILE, FP32_FILE, INT8_FILE

from ..shared.inference_models import CLASSES, checkpoint, labelled_by_the_model, random_pictures


@pytest.fixture
def folder_with_a_broken_file(tmp_path):
    folder = tmp_path / "in"
    random_pictures(folder, 4, seed=0)
    whole = (folder / "img0.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return folder


def test_predict_json_lists_unreadable_files_and_exits_1(tmp_path, cache_dir, folder_with_a_broken_file, capsys):
    model = checkpoint(tmp_path / "run", cache_dir)
    out = tmp_path / "predictions.json"

    rc = main(["predict", "--model", str(tmp_path / "run"), str(folder_with_a_broken_file), "--format", "json", "--out", str(out)])

    assert rc == 1, "some inputs unreadable: exit 1, the others still predicted"
    doc = json.loads(out.read_text())
    assert doc["top_k"] == 3 and doc["model"]["classes"] == CLASSES and doc["model"]["backend"] == "torch"
    assert doc["model"]["card"]["file"] == str(model) and doc["unreadable"] == 1
    by_name = {r["path"].rsplit("/", 1)[-1]: r for r in doc["results"]}
    assert set(by_name) == {"img0.png", "img1.png", "img2.png", "img3.png", "truncated.png"}
    assert "truncated" in by_name["truncated.png"]["error"]
    for name in ("img0.png", "img1.png", "img2.png", "img3.png"):
        top = by_name[name]["top"]
        assert sorted({t["label"] for t in top}) == sorted(CLASSES)
        assert abs(sum(t["probability"] for t in top) - 1) < 1e-4  # k = all 3 classes
    assert "1 UNREADABLE" in capsys.readouterr().err


def test_predict_csv_and_table_agree_and_a_clean_run_exits_0(tmp_path, cache_dir, capsys):
    checkpoint(tmp_path / "run", cache_dir)
    images = random_pictures(tmp_path / "in", 3, seed=1)
    args = ["predict", "--model", str(tmp_path / "run" / "model.safetensors"), str(tmp_path / "in" / "*.png"), "--top-k", "2"]

    assert main([*args, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert main([*args, "--format", "table"]) == 0
    table = capsys.readouterr().out.splitlines()

    assert [r["path"] for r in rows] == [str(p) for p in images]
    assert list(rows[0]) == ["path", "status", "label_1", "probability_1", "label_2", "probability_2", "error"]
    for row, line in zip(rows, table):
        assert row["status"] == "ok" and row["error"] == "" and float(row["probability_1"]) >= float(row["probability_2"])
        assert line.startswith(row["path"]) and f"{row['label_1']} {float(row['probability_1']):.3f}" in line


def test_predict_refuses_a_pickle_and_an_empty_input(tmp_path, cache_dir, capsys):
    checkpoint(tmp_path / "run", cache_dir)
    pickled = tmp_path / "model.pt"
    pickled.write_bytes(b"\x80\x04not safetensors")
    (tmp_path / "empty").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")

    assert main(["predict", "--model", str(pickled), str(tmp_path / "x.png")]) == 2
    assert "not a safetensors model" in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path / "run"), str(tmp_path / "empty")]) == 2
    assert "no image files" in capsys.readouterr().err


def test_export_without_int8_refuses_calibration_images(tmp_path, cache_dir, capsys):
    checkpoint(tmp_path / "run", cache_dir)
    assert main(["export", "--model", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--calibration", "fashion-mnist"]) == 2
    assert "only applies with --int8" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_export_writes_both_models_and_predict_runs_them(tmp_path, cache_dir, capsys):
    model = checkpoint(tmp_path / "run", cache_dir)
    labelled = labelled_by_the_model(model, tmp_path / "labelled", n=24)
    out = tmp_path / "out"

    rc = main(
        [
            "export",
            "--model",
            str(model),
            "--out",
            str(out),
            "--int8",
            "--calibration",
            str(labelled),
            "--eval",
            str(labelled),
            "--max-drop",
            "100",
        ]
    )

    printed = capsys.readouterr().out
    assert rc == 0 and sorted(p.name for p in out.iterdir()) == [EXPORT_FILE, INT8_FILE, FP32_FILE]
    assert "top-1 agreement 1.0000" in printed and "NOT private" in printed and str(out.resolve() / EXPORT_FILE) in printed
    # Each exported file classifies on its own (classes and preprocessing travel inside it).
    for name, backend in ((FP32_FILE, "onnxruntime-fp32"), (INT8_FILE, "onnxruntime-int8")):
        assert main(["predict", "--model", str(out / name), str(labelled), "--format", "json", "--device", "cpu"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["model"]["backend"] == backend and len(doc["results"]) == 24
