"""`fedlens data check`: what a site admin runs before joining (the command in-process, real files)."""

from __future__ import annotations

import json

import pytest
import torch

from fedlens.ops.cli import main
from fedlens.shared.checkpoint import save_checkpoint
from fedlens.shared.config import FedConfig

from ..shared.check_folder import write_check_folder

CLASSES = "trouser, bag, belt, sneaker"


@pytest.fixture
def site(tmp_path):
    return write_check_folder(tmp_path / "site")


def _check(capsys, *args):
    code = main(["data", "check", *map(str, args)])
    return code, capsys.readouterr().out


def test_json_report_and_exit_status(site, tmp_path, capsys):
    code, out = _check(capsys, site, "--classes", CLASSES, "--batch-size", 16, "--json")
    report = json.loads(out)
    assert code == 1  # the site would be refused: 'shoe' is no federation class
    assert report["classes_from"] == "--classes" and report["unknown"] == ["shoe"] and report["missing"] == ["sneaker"]
    assert report["tiny"] == ["belt"] and report["label_conflicts"]["groups"] == 1 and report["duplicates"]["extra_copies"] == 1
    assert report["skipped"]["by_reason"] == {"not an image": 1, "truncated": 1}
    assert not any("batch" in w for w in report["warnings"])  # 29 images to train on > batch-size 16

    cmap = tmp_path / "map.toml"
    cmap.write_text('shoe = "ignore"\n')
    code, out = _check(capsys, site, "--classes", CLASSES, "--class-map", cmap, "--out", tmp_path / "check.json")
    assert code == 0 and "WOULD BE REFUSED" not in out and "classes: trouser 12, bag 14, belt 3, sneaker 0" in out
    written = json.loads((tmp_path / "check.json").read_text())
    assert written["ignored"] == ["shoe"] and written["problems"] == []
    assert any("batch-size 256" in w for w in written["warnings"])  # the config default, when the run's is not given


def test_the_classes_come_from_a_model_a_state_folder_or_a_run_config(site, tmp_path, capsys):
    state = tmp_path / "state"
    state.mkdir()
    save_checkpoint(
        state / "global-model.safetensors", {"w": torch.zeros(1)}, config={}, classes=["trouser", "bag", "belt", "shoe"], round=3
    )
    code, out = _check(capsys, site, "--classes-from", state, "--json")
    report = json.loads(out)
    assert code == 0 and report["classes"] == ["trouser", "bag", "belt", "shoe"]
    assert report["classes_from"] == f"the model {state / 'global-model.safetensors'}"

    config = tmp_path / "run.toml"
    config.write_text(FedConfig.from_mapping({"dataset": "folder", "data-path": str(site), "classes": CLASSES}).to_toml())
    code, out = _check(capsys, site, "--classes-from", config, "--json")
    assert code == 1 and json.loads(out)["classes"] == ["trouser", "bag", "belt", "sneaker"]

    server = tmp_path / "server-eval"
    for name in ("trouser", "Bag", "belt", "shoe"):
        (server / name).mkdir(parents=True)
    config.write_text(FedConfig.from_mapping({"dataset": "folder", "data-path": str(server)}).to_toml())
    code, out = _check(capsys, site, "--classes-from", config, "--json")
    assert code == 0 and json.loads(out)["classes"] == ["Bag", "belt", "shoe", "trouser"]  # the server folder's own names


def test_bad_arguments_are_clear_errors(site, tmp_path, capsys):
    assert main(["data", "check", str(site), "--classes", "a", "--classes-from", str(tmp_path)]) == 2
    assert "--classes or --classes-from" in capsys.readouterr().err
    assert main(["data", "check", str(site), "--classes-from", str(tmp_path)]) == 2
    assert "holds no model.safetensors" in capsys.readouterr().err
    assert main(["data", "check", str(site), "--class-map", str(tmp_path / "absent.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
