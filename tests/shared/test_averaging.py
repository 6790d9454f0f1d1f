"""The server's average of global models over rounds."""

from __future__ import annotations

import pytest
import torch

from fedlens.shared.averaging import ModelAverage


def _models(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"w": torch.randn(3, 2, generator=g), "b": torch.randn(2, generator=g), "steps": torch.tensor(k)} for k in range(n)]


def test_the_average_follows_the_recurrence_from_the_first_model():
    models, d = _models(4), 0.7
    avg = ModelAverage(d)
    out = [avg.update(m) for m in models]
    expected = models[0]["w"].clone()
    assert torch.equal(out[0]["w"], models[0]["w"])
    for m, got in zip(models[1:], out[1:]):
        expected = d * expected + (1 - d) * m["w"]
        assert torch.allclose(got["w"], expected, atol=1e-6)
    assert int(out[-1]["steps"]) == 3  # counters come from the newest model, not averaged


def test_zero_decay_returns_each_model_and_copies_are_independent():
    models = _models(2)
    avg = ModelAverage(0.0)
    first = avg.update(models[0])
    second = avg.update(models[1])
    assert torch.equal(second["w"], models[1]["w"])
    first["w"].add_(100.0)
    models[1]["w"].add_(100.0)
    assert torch.equal(avg.state["w"], second["w"])  # neither the caller's input nor output aliases the average


def test_restore_continues_the_same_average():
    models, d = _models(3), 0.5
    straight = ModelAverage(d)
    for m in models:
        end = straight.update(m)
    resumed = ModelAverage(d)
    resumed.update(models[0])
    saved = resumed.state
    again = ModelAverage(d)
    again.restore(saved)
    for m in models[1:]:
        got = again.update(m)
    assert torch.allclose(got["w"], end["w"]) and torch.allclose(got["b"], end["b"])


def test_mismatched_models_and_bad_decays_are_refused():
    avg = ModelAverage(0.9)
    avg.update({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="does not match"):
        avg.update({"w": torch.zeros(3)})
    with pytest.raises(ValueError, match="does not match"):
        avg.update({"v": torch.zeros(2)})
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="ema-decay"):
            ModelAverage(bad)
