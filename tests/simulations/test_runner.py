"""The local runner's filter on Flower's log: it drops the one notice it names, nothing else."""

from __future__ import annotations

import io
import logging

from flwr.supercore.logger import warn_deprecated_feature

from fedlens.simulations.runner import _DropRunSimulationNotice

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
