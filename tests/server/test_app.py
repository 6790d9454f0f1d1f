"""The ServerApp's steps: the wait for a local simulation's sites, the per-round recorder, seeded site sampling."""

from __future__ import annotations

import logging
import random
import time

import pytest
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedlens.server.app import _await_sites, _resume, _RoundRecorder, _seeded_site_sampling, _WallClock
from fedlens.server.guard import RoundReport, RunDiverged, SiteGuard
from fedlens.shared.averaging import ModelAverage
from fedlens.shared.checkpoint import load_checkpoint
from fedlens.shared.config import FedConfig
from fedlens.shared.errors import ConfigError
from fedlens.shared.metrics import ClassificationReport
from fedlens.shared.rundir import RunDir


class ArrivingGrid:
    """Node ids as a simulation registers them: one more every ``every`` seconds, up to ``total``."""

    def __init__(self, total: int, every: float) -> None:
        self.total, self.every, self.start = total, every, time.monotonic()

    def get_node_ids(self) -> list[int]:
        arrived = min(self.total, 1 + int((time.monotonic() - self.start) / self.every))
        return list(range(100, 100 + arrived))


def test_waits_until_every_expected_site_is_connected():
    grid = ArrivingGrid(total=4, every=0.1)
    _await_sites(grid, 4, wait_s=10.0)
    assert len(grid.get_node_ids()) == 4
    assert time.monotonic() - grid.start >= 0.3


def test_gives_up_after_the_wait_and_says_how_many_came(caplog):
    grid = ArrivingGrid(total=2, every=0.01)
    with caplog.at_level(logging.WARNING, logger="fedlens.server"):
        began = time.monotonic()
        _await_sites(grid, 5, wait_s=0.5)
    assert 0.5 <= time.monotonic() - began < 5.0
    assert "only 2 of 5 sites connected" in caplog.text


class BiasTask:
    """Stands in for ``Task``: a linear model whose reported accuracy is its first bias,
    so a test can tell which weights were evaluated."""

    def __init__(self) -> None:
        self.model = torch.nn.Linear(2, 3)

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def evaluate(self, _data: object) -> ClassificationReport:
        acc = float(self.model.bias[0].detach())
        return ClassificationReport(acc, 1.0 - acc, acc, acc, acc, acc, [], [], [], [], [], [], 4)


def _weights(bias: float) -> ArrayRecord:
    return ArrayRecord({"weight": torch.zeros(3, 2), "bias": torch.full((3,), bias)})


def _recorder(tmp_path, *, sites: dict[str, dict[str, float]], rounds_done: int = 0, averager=None):
    cfg = FedConfig.from_mapping({"num-rounds": 5})
    run = RunDir.create(tmp_path / "run", cfg)
    guard = SiteGuard(FedAvg())
    guard.current = RoundReport()
    guard.current.train = sites
    guard.current.failed = {7: "train: no reply within round-timeout"}
    recorder = _RoundRecorder(
        cfg,
        run,
        BiasTask(),
        None,
        classes=("a", "b", "c"),
        guard=guard,
        averager=averager,
        rounds_done=rounds_done,
        wall=_WallClock(time.monotonic(), previous=12.0),
    )
    return recorder, run


def test_the_recorder_skips_the_initial_model_and_numbers_rounds_across_a_resume(tmp_path, caplog):
    recorder, run = _recorder(tmp_path, sites={"site-a": {"epsilon": 1.5}, "site-b": {"epsilon": 2.25}}, rounds_done=2)
    assert recorder.evaluate(0, _weights(0.4)) is None
    with caplog.at_level(logging.INFO, logger="fedlens.server"):
        metrics = recorder.evaluate(1, _weights(0.4))
    assert metrics["accuracy"] == pytest.approx(0.4)
    (record,) = run.records()
    assert record["round"] == 3 and record["elapsed_s"] >= 12.0
    assert record["privacy"] == {"site_epsilon": {"site-a": 1.5, "site-b": 2.25}}
    assert record["failures"] == {"node-7": "train: no reply within round-timeout"}
    assert "server_unaveraged" not in record
    assert load_checkpoint(run.path).meta["round"] == 3
    assert "round 3/5  accuracy 0.4000" in caplog.text and "sites 2/3 ok  max site ε 2.25" in caplog.text


def test_the_recorder_says_when_a_round_was_not_private(tmp_path, caplog):
    recorder, run = _recorder(tmp_path, sites={"site-a": {"train-loss": 0.5}})
    with caplog.at_level(logging.INFO, logger="fedlens.server"):
        recorder.evaluate(1, _weights(0.4))
    assert run.records()[0]["privacy"] == {"site_epsilon": {}}
    assert "NOT private" in caplog.text


def test_with_ema_the_recorder_keeps_the_average_and_reports_the_rounds_own_model(tmp_path):
    recorder, run = _recorder(tmp_path, sites={}, averager=ModelAverage(0.5))
    recorder.evaluate(1, _weights(0.2))
    metrics = recorder.evaluate(2, _weights(0.6))
    assert metrics["accuracy"] == pytest.approx(0.4)  # 0.5 * 0.2 + 0.5 * 0.6
    record = run.records()[-1]
    assert record["server"]["accuracy"] == pytest.approx(0.4)
    assert record["server_unaveraged"]["accuracy"] == pytest.approx(0.6)
    ckpt = load_checkpoint(run.path)  # the average is published; training resumes from the plain aggregate
    assert torch.allclose(ckpt.state["bias"], torch.full((3,), 0.4))
    assert torch.allclose(ckpt.training_state["bias"], torch.full((3,), 0.6))


def test_a_run_resumes_only_with_the_classes_it_was_trained_on(tmp_path):
    recorder, run = _recorder(tmp_path, sites={})
    recorder.evaluate(1, _weights(0.3))  # the checkpoint records classes a, b, c
    with pytest.raises(ConfigError, match="trained on the classes a, b, c, but the evaluation data now gives a, b, d"):
        _resume(run, BiasTask(), None, done=1, num_rounds=5, classes=("a", "b", "d"))
    task = BiasTask()
    _resume(run, task, None, done=1, num_rounds=5, classes=("a", "b", "c"))
    assert torch.allclose(task.model.bias, torch.full((3,), 0.3))


class FixedGrid:
    def get_node_ids(self) -> list[int]:
        return list(range(100, 120))


def _flower_samples(seed: int) -> list[list[int]]:
    with _seeded_site_sampling(seed):
        return [sample_nodes(FixedGrid(), 2, 5)[0] for _ in range(3)]


def test_flower_samples_the_same_sites_for_the_same_seed():
    assert _flower_samples(3) == _flower_samples(3)
    assert _flower_samples(3) != _flower_samples(4)


def test_the_callers_random_state_is_given_back():
    random.seed(123)
    expected = [random.random() for _ in range(3)]
    random.seed(123)
    _flower_samples(3)
    assert [random.random() for _ in range(3)] == expected


def test_a_diverged_round_is_neither_recorded_nor_published(tmp_path):
    recorder, run = _recorder(tmp_path, sites={})
    recorder.evaluate(1, _weights(0.4))  # loss 0.6
    with pytest.raises(RunDiverged, match=r"round 2: the global model diverged: test loss 31, past 10 x chance level's 1.099") as err:
        recorder.evaluate(2, _weights(-30.0))  # loss 31
    assert err.value.round == 2 and "The model of round 1 stays published" in str(err.value)
    assert "learning rate" in str(err.value) and "max-grad-norm" in str(err.value) and "poisoned updates" in str(err.value)
    assert [r["round"] for r in run.records()] == [1] and load_checkpoint(run.path).meta["round"] == 1


def test_a_later_round_is_held_to_round_ones_loss_and_non_finite_loss_always_stops(tmp_path):
    recorder, run = _recorder(tmp_path, sites={})
    recorder.evaluate(1, _weights(-1.0))  # loss 2.0, above chance (ln 3): the reference from now on
    recorder.evaluate(2, _weights(-15.0))  # loss 16: within 10 x 2.0
    with pytest.raises(RunDiverged, match="past 10 x round 1's 2"):
        recorder.evaluate(3, _weights(-25.0))
    with pytest.raises(RunDiverged, match="test loss nan"):
        recorder.evaluate(3, _weights(float("nan")))
    assert load_checkpoint(run.path).meta["round"] == 2


def test_a_first_round_that_diverges_records_nothing(tmp_path):
    recorder, run = _recorder(tmp_path, sites={})
    with pytest.raises(RunDiverged, match=r"The model of round 0 stays published \(the model the run started from\)"):
        recorder.evaluate(1, _weights(-30.0))
    assert run.records() == [] and not (run.path / "model.safetensors").exists()  # serve() publishes the starting model


def test_the_deployed_server_app_refuses_a_run_with_simulated_attackers(tmp_path):
    from flwr.app import Context, RecordDict

    from fedlens.server.app import _open_run_dir
    from fedlens.shared.errors import ConfigError

    run_config = {**FedConfig.from_mapping({"attack": "sign-flip", "attack-sites": "0"}).to_dict(), "run-dir": str(tmp_path / "run")}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(ConfigError, match="for simulations only"):
        _open_run_dir(context)
    assert not (tmp_path / "run").exists()
