"""Attribution methods, their trust checks, and the report, on models whose answer is known."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from torch import nn

from fedlens.shared.checkpoint import save_checkpoint
from fedlens.shared.config import FedConfig
from fedlens.shared.data import ClassMap, LabelMismatch
from fedlens.shared.errors import CheckpointError, DataError
from fedlens.shared.explain import ExplainOptions, attribute, deletion_insertion, explain, method_names, randomized_copy, rank_correlation
from fedlens.shared.explain.render import _site_privacy
from fedlens.shared.models import FedModel
from fedlens.shared.task import Task


class _LeftHalf(nn.Module):
    """Zeroes the right half of the image: a model built on it can only use the left half."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros_like(x)
        mask[..., : x.shape[-1] // 2] = 1
        return x * mask


def _left_model() -> FedModel:
    torch.manual_seed(0)
    model = FedModel(
        stem=nn.Sequential(_LeftHalf(), nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()),
        blocks=[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())],
        neck=nn.Identity(),
        classifier=nn.Linear(8, 3),
    )
    with torch.no_grad():  # a confident model, so removing evidence visibly moves its output
        model.stages.classifier.weight.mul_(40)
    return model.eval()


def _images(n: int = 6, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", ["integrated-gradients", "saliency", "occlusion"])
def test_pixel_methods_put_the_mass_where_the_model_looks(method):
    model, x = _left_model(), _images()
    targets = model(x).argmax(1)
    maps = attribute(method, model, x, targets)
    assert maps.shape == (6, 16, 16) and torch.isfinite(maps).all() and (maps >= 0).all()
    left = maps[..., :8].sum() / maps.sum()
    assert left > 0.95, f"{method}: only {left:.2f} of the attribution on the half the model sees"


def test_every_method_is_deterministic_and_grad_cam_is_upsampled():
    model, x = _left_model(), _images(4)
    targets = torch.tensor([0, 1, 2, 0])
    for method in method_names():
        a = attribute(method, model, x, targets)
        b = attribute(method, model, x, targets)
        assert a.shape == (4, 16, 16) and torch.equal(a, b), method


def test_deletion_favours_the_faithful_ranking():
    model, x = _left_model(), _images(8)
    targets = model(x).argmax(1)
    good = attribute("saliency", model, x, targets)
    bad = torch.flip(good, dims=[-1])  # ranks the (ignored) right half first
    faithful, unfaithful = deletion_insertion(model, x, targets, good), deletion_insertion(model, x, targets, bad)
    assert faithful.deletion_auc < unfaithful.deletion_auc
    assert faithful.insertion_auc > unfaithful.insertion_auc
    assert faithful.score > unfaithful.score
    assert len(faithful.deletion_curve) == 11


def test_randomised_copy_redraws_weights_and_keeps_the_original():
    model = _left_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = randomized_copy(model, seed=3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), "the original model changed"
    changed = [k for k, v in twin.state_dict().items() if not torch.equal(v, before[k])]
    assert set(changed) == {k for k in before if k.endswith(("weight", "bias"))}


def test_rank_correlation_detects_identical_opposite_and_constant_maps():
    a = torch.rand(3, 5, 5, generator=torch.Generator().manual_seed(0))
    assert np.allclose(rank_correlation(a, a), 1.0)
    assert np.allclose(rank_correlation(a, -a), -1.0)
    assert np.allclose(rank_correlation(a, torch.zeros_like(a)), 0.0)


# ---- the report ----------------------------------------------------------------------


@pytest.fixture
def model_file(tmp_path, cache_dir, image_folder):
    cfg = FedConfig.from_mapping({"image-size": 32, "cache-dir": cache_dir, "dataset": "folder", "data-path": str(image_folder)})
    task = Task(cfg, 3)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, task.model.state_dict(), config=cfg.to_dict(), classes=["alpha", "beta", "gamma"], round=2)
    return path


def test_report_is_self_contained_and_matches_its_json(model_file, image_folder, tmp_path):
    out = tmp_path / "report"
    report = explain(model_file, str(image_folder), out, ExplainOptions(per_class=2, sanity_images=4))
    html = (out / "report.html").read_text()
    saved = json.loads((out / "report.json").read_text())
    assert saved["performance"]["accuracy"] == report["performance"]["accuracy"]
    assert len(saved["examples"]) == 6 and set(saved["trust"]["methods"]) == set(method_names())
    for t in saved["trust"]["methods"].values():
        assert -1.0 <= t["faithfulness"] <= 1.0 and t["randomisation_rank_correlation"] is not None
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(srcs) == 6 * 5 + 3  # each example + 4 maps; confusion, ROC, curves
    assert all(s.startswith("data:image/png;base64,") for s in srcs)  # nothing to fetch
    assert "http://" not in html and "https://" not in html
    assert "How to read this report" in html and "privacy" in html


def test_bad_model_files_are_refused_with_a_reason(model_file, image_folder, tmp_path):
    pickled = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(1)}, pickled)
    with pytest.raises(CheckpointError, match="not a safetensors"):
        explain(pickled, str(image_folder), tmp_path / "r1")
    cfg = FedConfig.from_mapping({"image-size": 32, "dataset": "folder", "data-path": str(image_folder)})
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, Task(cfg, 5).model.state_dict(), config=cfg.to_dict(), classes=["alpha", "beta", "gamma"], round=1)
    with pytest.raises(CheckpointError, match="does not fit"):
        explain(other, str(image_folder), tmp_path / "r2")
    with pytest.raises(ValueError, match="unknown attribution method"):
        explain(model_file, str(image_folder), tmp_path / "r3", ExplainOptions(methods=("lime",)))


def test_bad_data_is_refused_or_reported(model_file, image_folder, tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError):
        explain(model_file, str(tmp_path / "empty"), tmp_path / "r1")
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for name in ("alpha", "beta", "zeta"):
        (renamed / name).symlink_to(image_folder / ("gamma" if name == "zeta" else name))
    with pytest.raises(LabelMismatch, match="'zeta', not one of the classes trained on"):
        explain(model_file, str(renamed), tmp_path / "r2")
    missing = tmp_path / "missing-class"
    missing.mkdir()
    (missing / "alpha").symlink_to(image_folder / "alpha")
    (missing / "beta").symlink_to(image_folder / "beta")
    (missing / "gamma").mkdir()
    with caplog.at_level(logging.WARNING, logger="fedlens"):
        report = explain(model_file, str(missing), tmp_path / "r3", ExplainOptions(methods=("saliency",), per_class=1, sanity_images=2))
    assert "gamma" in caplog.text and "no images" in caplog.text
    assert report["data"]["per_class"] == [12, 12, 0]


def test_a_site_explains_with_its_own_folder_names_through_its_class_map(model_file, image_folder, tmp_path):
    own = tmp_path / "own-names"
    own.mkdir()
    for name, target in (("Alpha", "alpha"), ("b", "beta"), ("Gamma", "gamma"), ("scratch", "gamma")):
        (own / name).symlink_to(image_folder / target)
    cmap = ClassMap.from_mapping({"b": "beta", "scratch": "ignore"})
    options = ExplainOptions(methods=("saliency",), per_class=1, sanity_images=2)
    report = explain(model_file, str(own), tmp_path / "r", options, class_map=cmap)
    assert report["performance"]["classes"] == ["alpha", "beta", "gamma"]
    assert report["data"]["per_class"] == [12, 12, 12]  # 'scratch' is left out, not counted as gamma


def test_report_is_reproducible_and_leaves_the_global_rng_alone(model_file, image_folder, tmp_path):
    options = ExplainOptions(methods=("saliency", "integrated-gradients"), per_class=1, sanity_images=2, smoothgrad=2, seed=5)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = explain(model_file, str(image_folder), tmp_path / "a", options)
    assert torch.equal(torch.rand(3), expected_next), "explain changed the caller's random state"
    second = explain(model_file, str(image_folder), tmp_path / "b", options)
    for report in (first, second):
        report.pop("seconds")
        for t in report["trust"]["methods"].values():
            t.pop("seconds")
    assert first == second


def test_the_model_card_lists_a_few_sites_and_summarises_a_thousand():
    few = {f"site-{i}": {"epsilon": 1.0 + i, "delta": 1e-5} for i in range(3)}
    html_few = _site_privacy(few)
    assert html_few.count("<tr>") == 4 and "site-2" in html_few
    many = {f"site-{i}": {"epsilon": i / 100, "delta": 1e-5} for i in range(1000)}
    html_many = _site_privacy(many)
    assert html_many.count("<tr>") == 6  # header and the five largest spenders
    assert "1000 sites trained" in html_many and "min 0.000, median 4.995, max 9.990" in html_many
    assert "site-999" in html_many and "site-0<" not in html_many
    assert "fedlens privacy show" in html_many


def test_the_model_card_names_sites_that_trained_without_dp():
    # A non-private run's summary gives each site "not private" instead of its epsilon and delta.
    few = {"site-0": "not private", "site-1": {"epsilon": 2.0, "delta": 1e-5}}
    html_few = _site_privacy(few)
    assert "<td colspan=2>not private</td>" in html_few and "2.000" in html_few
    many = {f"site-{i}": "not private" for i in range(30)}
    assert "30 sites trained; 30 of them without DP-SGD." in _site_privacy(many)
