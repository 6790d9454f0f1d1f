"""The local runner: its filter on Flower's log, and its checks before a run starts."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from flwr.supercore.logger import warn_deprecated_feature

from fedlens.shared.config import FedConfig
from fedlens.shared.errors import DataError
from fedlens.simulations.runner import _check_privacy, _DropRunSimulationNotice, _log_partitions

# What Flower 1.42's `run_simulation` logs on every call (flwr/simulation/run_simulation.py).
RUN_SIMULATION_NOTICE = (
    "The `run_simulation` function is deprecated and will be removed in a future "
    "version of Flower. Please use `flwr run` in the CLI instead to run your "
    "simulation. Refer to the Flower Tutorials "
    "for more details: https://flower.ai/docs/framework/tutorial-quickstart-pytorch.html"
)


def _flower_output(*notices: str) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(_DropRunSimulationNotice())
    flower = logging.getLogger("flwr")
    flower.addHandler(handler)
    try:
        for notice in notices:
            warn_deprecated_feature(notice)
    finally:
        flower.removeHandler(handler)
    return stream.getvalue()


def test_the_run_simulation_notice_is_dropped():
    assert _flower_output(RUN_SIMULATION_NOTICE) == ""


def test_other_deprecation_notices_still_show():
    out = _flower_output(
        RUN_SIMULATION_NOTICE,
        "`Driver.create_message` / `Grid.create_message` is deprecated.Use `Message` constructor instead.",
        "`SecAggPlusWorkflow` is deprecated",
    )
    assert "run_simulation" not in out
    assert "Grid.create_message` is deprecated" in out and "`SecAggPlusWorkflow` is deprecated" in out


def _sites(sizes: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
    labels = np.arange(sum(sizes)) % 3
    bounds = np.cumsum([0, *sizes])
    return labels, [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def test_sites_no_larger_than_a_batch_are_named_and_the_run_goes_on(caplog):
    labels, sites = _sites([200, 200, 200, 20, 30])
    cfg = FedConfig.from_mapping({"num-sites": 5, "batch-size": 32, "site-eval-fraction": 0.0})
    with caplog.at_level(logging.WARNING, logger="fedlens.simulations"):
        _check_privacy(cfg, labels, sites)
    assert "2 of 5 sites hold no more training images than one DP batch (batch-size 32; the smallest holds 20)" in caplog.text


def test_too_few_sites_larger_than_a_batch_for_min_sites_is_refused_before_the_run():
    labels, sites = _sites([200, 20, 30, 10])
    cfg = FedConfig.from_mapping({"num-sites": 4, "min-sites": 2, "batch-size": 32, "site-eval-fraction": 0.0})
    with pytest.raises(DataError, match=r"only 1 of 4 sites hold more training images than `batch-size` \(32; the smallest holds 10\)"):
        _check_privacy(cfg, labels, sites)


def test_the_partition_log_summarises_a_large_federation(caplog):
    cfg = FedConfig.from_mapping({"num-sites": 1000})
    counts = [[6, 0, 3] if i % 2 else [2, 2, 2] for i in range(1000)]
    with caplog.at_level(logging.INFO, logger="fedlens.simulations"):
        _log_partitions(cfg, counts, ("a", "b", "c"))
    assert len(caplog.records) == 2
    assert "images per site: min 6, median 7, max 9; classes per site: min 2, median 2, max 3" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fedlens.simulations"):
        _log_partitions(FedConfig.from_mapping({"num-sites": 3}), counts[:3], ("a", "b", "c"))
    assert len(caplog.records) == 5  # title, header, one row per site
