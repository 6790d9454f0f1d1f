"""Averaging the global models over rounds: what the server publishes when ``ema-decay`` > 0.

Under DP-SGD every round's global model carries fresh noise. An exponential moving
average (EMA) of those models keeps their common direction and averages the noise
down, the way Polyak-Ruppert averaging does for SGD iterates. It reads only models
the server already holds, so it is post-processing: it costs no privacy. The sites
keep training from the plain aggregate; the average is what gets evaluated, saved
and explained.
"""

from __future__ import annotations

import torch

__all__ = ["ModelAverage"]


class ModelAverage:
    """Exponential moving average of a sequence of state dicts.

    The first model starts the average (no pull towards the pretrained start);
    after that ``average = decay * average + (1 - decay) * model``. Tensors that are
    not floating point (counters) are taken from the newest model.

    Parameters
    ----------
    decay : float
        Weight of the running average, in [0, 1); 0 returns each model unchanged.
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"`ema-decay` must be in [0, 1), got {decay}")
        self.decay = decay
        self._average: dict[str, torch.Tensor] | None = None

    @property
    def state(self) -> dict[str, torch.Tensor] | None:
        """The current average (a copy), or None before the first model."""
        return None if self._average is None else {k: v.clone() for k, v in self._average.items()}

    def restore(self, average: dict[str, torch.Tensor]) -> None:
        """Continue from a saved average (after a server restart)."""
        self._average = {k: v.detach().clone() for k, v in average.items()}

    def update(self, model: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fold ``model`` into the average and return the new average (a copy).

        Raises
        ------
        ValueError
            When ``model`` does not have the same tensor names and shapes as the average.
        """
        if self._average is None:
            self._average = {k: v.detach().clone() for k, v in model.items()}
            return self.state  # type: ignore[return-value]
        if model.keys() != self._average.keys() or any(model[k].shape != v.shape for k, v in self._average.items()):
            raise ValueError("the model to average does not match the running average (names or shapes differ)")
        d = self.decay
        for k, v in model.items():
            if v.is_floating_point():
                self._average[k].mul_(d).add_(v.detach().to(self._average[k].dtype), alpha=1.0 - d)
            else:
                self._average[k] = v.detach().clone()
        return self.state  # type: ignore[return-value]
