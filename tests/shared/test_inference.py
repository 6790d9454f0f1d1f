"""Using a trained model: folding, the predictors, file inputs, and the ONNX / INT8 export with its checks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn.modules.batchnorm import _BatchNorm

from fedlens.shared.checkpoint import GLOBAL_MODEL_FILE
from fedlens.shared.data import load_image_folder
from fedlens.shared.errors import CheckpointError, DataError
from fedlens.shared.inference import (
    EXPORT_FILE,
    FP32_FILE,
    INT8_FILE,
    NOT_PRIVATE,
    ExportOptions,
    ExportRefused,
    OnnxPredictor,
    TorchPredictor,
    expand_inputs,
    export_model,
    fold_for_inference,
    load_model,
    load_predictor,
    predict_files,
    read_onnx_metadata,
    stack_images,
    top_k,
)
from fedlens.shared.models import LowRankConv, apply_low_rank, apply_policy, create_model, list_backbones, parse_policy

from .inference_models import CLASSES, checkpoint, labelled_by_the_model, perturb, random_pictures

# ---- folding -------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", list_backbones())
def test_folded_model_gives_the_logits_of_the_model_as_trained(backbone):
    torch.manual_seed(0)
    model = create_model(backbone, num_classes=3, pretrained=False)
    cut = apply_policy(model, parse_policy("last-2"))
    adapters = apply_low_rank(model, cut, 4)
    perturb(model)
    model.eval()
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(1))

    folded = fold_for_inference(model)

    with torch.no_grad():
        want, got = model(x), folded.model(x)
    assert torch.allclose(want, got, atol=1e-4, rtol=1e-4), f"{backbone}: max diff {(want - got).abs().max():.2e}"
    assert folded.adapters_merged == adapters  # (ResNet's last blocks have no pointwise convolution to adapt)
    assert not any(isinstance(m, LowRankConv) for m in folded.model.modules())
    left = sum(isinstance(m, _BatchNorm) for m in folded.model.modules())
    assert folded.batchnorms_left == left and folded.batchnorms_folded > 0
    if backbone != "resnet18":  # only ResNet keeps BatchNorms outside a Sequential (its basic blocks)
        assert left == 0
    assert sum(isinstance(m, LowRankConv) for m in model.modules()) == adapters, "the original must be left unchanged"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export with INT8 (accepted: any drop allowed), shared by the tests that read it."""
    base = tmp_path_factory.mktemp("export")
    model = checkpoint(base / "run", str(base / "cache"))
    labelled = labelled_by_the_model(model, base / "labelled")
    record = export_model(model, base / "out", ExportOptions(int8=True, calibration=str(labelled), eval=str(labelled), max_drop=100.0))
    return model, labelled, base / "out", record


# ---- loading and predicting ------------------------------------------------------------


def test_predictor_decodes_files_exactly_as_training_does(tmp_path, cache_dir):
    model = checkpoint(tmp_path / "run", cache_dir)
    root = tmp_path / "images"
    for name in CLASSES:
        random_pictures(root / name, 3, seed=len(name))
    loaded = load_model(tmp_path / "run")  # a run folder
    images, _report = load_image_folder(root, transform=loaded.transform)  # the training data path
    files = sorted(root.rglob("*.png"))

    trained = loaded.task.predict(loaded.task.prepare(images, for_training=False)).numpy()
    predictor = TorchPredictor(loaded, fold=False)
    served = predictor.logits(stack_images([predictor.decode(f) for f in files]))

    assert np.allclose(served, trained, atol=1e-5)
    assert loaded.path == model and loaded.classes == tuple(CLASSES)


def test_model_card_lists_each_sites_privacy(tmp_path, cache_dir):
    checkpoint(tmp_path / "run", cache_dir)
    card = load_model(tmp_path / "run").card
    assert card["classes"] == CLASSES and card["backbone"] == "efficientnet-lite0" and card["rounds"] == 3 and card["sites"] == 2
    assert card["private"] is False and "site-b" in card["privacy_reason"]
    assert card["site_privacy"] == {"site-a": {"epsilon": 2.5, "delta": 1e-5}, "site-b": NOT_PRIVATE}


def test_a_sites_state_folder_loads_its_global_model_with_privacy_unknown(tmp_path, cache_dir):
    model = checkpoint(tmp_path / "run", cache_dir)
    state = tmp_path / "state"
    state.mkdir()
    shutil.copy(model, state / GLOBAL_MODEL_FILE)
    loaded = load_model(state)
    assert loaded.path == state / GLOBAL_MODEL_FILE
    assert loaded.card["private"] is None and loaded.card["site_privacy"] == {}
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors .* and no global-model.safetensors"):
        load_model(tmp_path / "empty")


def test_unreadable_files_are_results_not_failures(tmp_path, cache_dir):
    model = checkpoint(tmp_path / "run", cache_dir)
    folder = tmp_path / "in"
    good = random_pictures(folder / "sub", 5, seed=1)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"")

    found = expand_inputs([folder, tmp_path / "nowhere.png", str(folder / "sub" / "img[01].png")])
    results = list(predict_files(load_predictor(model, device="cpu"), found.files, k=2, batch_size=3))

    assert found.ignored == 1 and found.missing == [(str(tmp_path / "nowhere.png"), "no such file or folder")]
    assert len(found.files) == 7  # 5 good + 2 broken; the glob's matches were already listed
    failed = {r.path.name: r.error for r in results if not r.ok}
    assert set(failed) == {"broken.png", "empty.jpg"} and "empty" in failed["empty.jpg"]
    ok = [r for r in results if r.ok]
    assert sorted(r.path for r in ok) == sorted(good)
    for r in ok:
        assert len(r.top) == 2 and r.top[0][1] >= r.top[1][1] and {label for label, _ in r.top} <= set(CLASSES)


def test_top_k_orders_and_caps():
    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]])
    assert top_k(probs, CLASSES, 2) == [[("beta", 0.7), ("gamma", pytest.approx(0.2))], [("alpha", 0.5), ("beta", 0.25)]]
    assert len(top_k(probs, CLASSES, 10)[0]) == 3


# ---- export -----------------------------------------------------------------------------


@pytest.mark.slow
def test_onnx_export_agrees_with_pytorch_and_describes_itself(exported):
    model, labelled, out, record = exported
    check = record["onnx"]["check_vs_torch"]
    assert check["max_abs_logit_diff"] < 1e-3 and check["top1_agreement"] == 1.0 and check["images"] == 48
    assert record["onnx"]["opset"] == 20 and record["fold"] == {"adapters_merged": 1, "batchnorms_folded": 49, "batchnorms_left": 0}

    onnx_model = OnnxPredictor(out / FP32_FILE, threads=1)
    torch_model = TorchPredictor(load_model(model))
    files = sorted(labelled.rglob("*.png"))[:10]
    batch = stack_images([torch_model.decode(f) for f in files])
    assert np.allclose(onnx_model.probabilities(batch), torch_model.probabilities(batch), atol=1e-5)
    assert onnx_model.classes == tuple(CLASSES) and onnx_model.backend == "onnxruntime-fp32"
    assert onnx_model.transform.key == torch_model.transform.key  # the file carries the training preprocessing
    assert load_predictor(out / INT8_FILE).backend == "onnxruntime-int8"


@pytest.mark.slow
def test_export_json_records_checks_calibration_and_model_card(exported):
    _model, labelled, out, record = exported
    on_disk = json.loads((out / EXPORT_FILE).read_text())
    assert on_disk == json.loads(json.dumps(record))
    q = on_disk["int8"]
    assert q["written"] is True and (out / INT8_FILE).stat().st_size == q["bytes"] < on_disk["onnx"]["bytes"] / 2
    assert q["accuracy_fp32"] == 1.0 and q["images"] == 48 and 0 <= q["top1_agreement_with_fp32"] <= 1
    assert q["calibration"]["source"] == str(labelled) and q["calibration"]["images"] == 48
    assert "outside the DP accounting" in q["calibration"]["note"]
    card = on_disk["model_card"]
    assert card["classes"] == CLASSES and card["rounds"] == 3 and card["site_privacy"]["site-b"] == NOT_PRIVATE
    assert read_onnx_metadata(out / INT8_FILE)["card"] == card
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"


@pytest.mark.slow
def test_int8_beyond_max_drop_is_refused_and_leaves_no_int8_file(exported, tmp_path):
    model, labelled, _out, _record = exported
    out = tmp_path / "out"
    out.mkdir()
    (out / INT8_FILE).write_bytes(b"an INT8 model of an earlier export")
    black = tmp_path / "black"  # calibrated on black images, the INT8 scales clip every real activation
    black.mkdir()
    for i in range(4):
        Image.fromarray(np.zeros((24, 24), np.uint8)).save(black / f"{i}.png")

    with pytest.raises(ExportRefused, match=r"accuracy .* a drop of .* points > --max-drop 0"):
        export_model(model, out, ExportOptions(int8=True, calibration=str(black), eval=str(labelled), max_drop=0.0))

    assert not (out / INT8_FILE).exists()
    assert sorted(p.name for p in out.iterdir()) == [EXPORT_FILE, FP32_FILE]
    q = json.loads((out / EXPORT_FILE).read_text())["int8"]
    assert q["written"] is False and q["drop_points"] > 0 and "max-drop" in q["refused"]


def test_export_needs_labelled_images_of_the_models_classes(tmp_path, cache_dir):
    model = checkpoint(tmp_path / "run", cache_dir)
    with pytest.raises(DataError, match="--eval DIR"):
        export_model(model, tmp_path / "out")
    other = tmp_path / "other"
    for name in ("cat", "dog"):
        random_pictures(other / name, 2, seed=0)
    with pytest.raises(DataError, match="not the model's classes"):
        export_model(model, tmp_path / "out", ExportOptions(eval=str(other)))
    with pytest.raises(DataError, match="public or server-held"):
        export_model(model, tmp_path / "out", ExportOptions(int8=True, eval=str(other)))
    assert not (tmp_path / "out").exists()
