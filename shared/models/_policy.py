"""Fine-tune policies: which part of a :class:`FedModel` trains and travels.

BatchNorm layers never train, under any policy: they keep their pretrained
statistics in eval mode. That keeps pretrained statistics intact, makes every
policy compatible with DP-SGD (per-sample gradients are undefined for batch
statistics) and means no buffers ever travel between sites and server.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..config import policy_parts
from ..errors import ConfigError
from ._types import FedModel

__all__ = ["FineTunePolicy", "parse_policy", "apply_policy", "train_mode", "trainable_state_dict", "load_trainable"]


@dataclass(frozen=True)
class FineTunePolicy:
    """``head`` (classifier only), ``last-N`` (last N blocks + neck + classifier) or ``full``."""

    kind: str
    blocks: int = 0

    def __str__(self) -> str:
        return f"last-{self.blocks}" if self.kind == "last" else self.kind

    def first_trainable_stage(self, model: FedModel) -> int:
        """Index of the first stage that trains; everything before it is frozen."""
        if self.kind == "full":
            return 0
        if self.kind == "head":
            return len(model.stages) - 1
        if self.blocks > model.num_blocks:
            raise ConfigError(
                f"policy {self} asks for {self.blocks} trainable blocks but the backbone has "
                f"{model.num_blocks}; use at most last-{model.num_blocks} or `full`"
            )
        return model.block_index(-self.blocks)


def parse_policy(text: str) -> FineTunePolicy:
    """Parse ``"head"``, ``"full"`` or ``"last-N"`` (N >= 1).

    Raises
    ------
    ConfigError
        For anything else.
    """
    kind, n = policy_parts(text)
    return FineTunePolicy(kind, n) if kind == "last" else FineTunePolicy(kind)


def apply_policy(model: FedModel, policy: FineTunePolicy) -> int:
    """Freeze what ``policy`` does not train; return the first trainable stage index."""
    cut = policy.first_trainable_stage(model)
    for i, stage in enumerate(model.stages):
        for p in stage.parameters():
            p.requires_grad_(i >= cut)
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            for p in module.parameters():
                p.requires_grad_(False)
    train_mode(model, False)
    return cut


def train_mode(model: nn.Module, training: bool = True) -> None:
    """Like ``model.train(training)`` but BatchNorm always stays in eval mode."""
    model.train(training)
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.eval()


def trainable_state_dict(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The parameters that train (and therefore travel), detached, in order."""
    return OrderedDict((n, p.detach()) for n, p in model.named_parameters() if p.requires_grad)


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the trainable parameters of ``model``.

    Raises
    ------
    ValueError
        If the names or shapes differ from the model's trainable parameters (the
        sender used another backbone, class count or policy).
    """
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    if set(params) != set(state):
        missing = sorted(set(params) - set(state))[:3]
        extra = sorted(set(state) - set(params))[:3]
        raise ValueError(
            f"received parameters do not match this model's trainable part (missing {missing}, "
            f"unexpected {extra}): server and site disagree on backbone, classes or policy"
        )
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise ValueError(f"parameter {name} has shape {tuple(value.shape)}, expected {tuple(params[name].shape)}")
            params[name].copy_(value)
