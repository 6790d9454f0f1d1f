import json
import pickle

import pytest
import torch

from fedlens.shared.checkpoint import load_checkpoint, save_checkpoint
from fedlens.shared.errors import CheckpointError
from fedlens.shared.io import append_jsonl, atomic_write_json


def test_checkpoint_round_trip_embeds_metadata(tmp_path):
    state = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.int64)}
    save_checkpoint(tmp_path / "m.safetensors", state, config={"num-rounds": 3}, classes=["x", "y"], round=2)
    ckpt = load_checkpoint(tmp_path / "m.safetensors")
    assert torch.equal(ckpt.state["a"], state["a"]) and torch.equal(ckpt.state["b"], state["b"])
    assert ckpt.meta == {"config": {"num-rounds": 3}, "classes": ["x", "y"], "round": 2}
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed away
    assert ckpt.training_state is None


def test_the_training_state_travels_in_the_same_file_but_apart_from_the_model(tmp_path):
    model = {"head.w": torch.full((2, 2), 0.5), "head.b": torch.zeros(2)}
    training = {"head.w": torch.full((2, 2), 2.0)}
    save_checkpoint(tmp_path / "m.safetensors", model, training_state=training, round=4)
    ckpt = load_checkpoint(tmp_path / "m.safetensors")
    assert set(ckpt.state) == {"head.w", "head.b"} and torch.equal(ckpt.state["head.w"], model["head.w"])
    assert set(ckpt.training_state) == {"head.w"} and torch.equal(ckpt.training_state["head.w"], training["head.w"])
    assert ckpt.meta == {"round": 4}


def test_pickle_checkpoints_are_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as fh:
        pickle.dump({"a": torch.ones(1)}, fh)
    with pytest.raises(CheckpointError, match="arbitrary code"):
        load_checkpoint(path)


def test_foreign_safetensors_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="not a fedlens model"):
        load_checkpoint(tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_atomic_json_and_jsonl(tmp_path):
    atomic_write_json(tmp_path / "s.json", {"k": 1})
    atomic_write_json(tmp_path / "s.json", {"k": 2})
    assert json.loads((tmp_path / "s.json").read_text()) == {"k": 2}
    append_jsonl(tmp_path / "m.jsonl", {"round": 1})
    append_jsonl(tmp_path / "m.jsonl", {"round": 2})
    assert [json.loads(line)["round"] for line in (tmp_path / "m.jsonl").read_text().splitlines()] == [1, 2]
