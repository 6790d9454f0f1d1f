"""Domain errors. Each message says what happened and how to fix it."""

from __future__ import annotations

__all__ = [
    "FedlensError",
    "ConfigError",
    "DataError",
    "WeightsError",
    "CheckpointError",
    "TrainingDiverged",
]


class FedlensError(Exception):
    """Base class of every error fedlens raises on purpose."""


class ConfigError(FedlensError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


class DataError(FedlensError):
    """A data set could not be found, read or used."""


class WeightsError(FedlensError):
    """Pretrained weights are missing, corrupt or do not fit the model."""


class CheckpointError(FedlensError):
    """A model checkpoint is unsafe, corrupt or belongs to another model."""


class TrainingDiverged(FedlensError):
    """Local training blew up (non-finite weights or an exploding loss) and was stopped.

    ``steps`` optimiser steps ran before it stopped: under DP-SGD each of them used
    noise and data, so the site's ledger records the round.
    """

    def __init__(self, message: str, *, steps: int) -> None:
        super().__init__(message)
        self.steps = steps
