"""One model prepared for a run: backbone + policy + preprocessing + data plumbing.

Server, sites and the centralized baseline all build the same :class:`Task` from
the same config, so the frozen part is identical everywhere and only the
trainable part ever needs to travel.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import FedConfig
from .data import (
    ImageSet,
    cached_features,
    default_cache_dir,
    feature_cache_path,
    parse_augment,
    stratified_split,
)
from .errors import ConfigError, TrainingDiverged
from .metrics import ClassificationReport, classification_report
from .models import (
    FedModel,
    ImageTransform,
    apply_low_rank,
    apply_policy,
    create_model,
    get_backbone,
    load_trainable,
    parse_policy,
    sha256_of,
    train_mode,
    trainable_state_dict,
)
from .privacy.dpsgd import DPSGD, PlainStepper, Stepper

__all__ = [
    "Task",
    "LocalData",
    "TrainStats",
    "resolve_device",
    "local_split",
    "local_split_indices",
    "site_seed",
    "divergence_cause",
    "local_steps",
]

_log = logging.getLogger(f"fedlens.{__name__}")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("`device = cuda` but no CUDA device is visible; use `auto` or `cpu`")
    return torch.device(name)


@dataclass(frozen=True)
class LocalData:
    """Training or evaluation inputs entering the model at stage ``start``.

    ``inputs`` are raw ``uint8`` images when ``start == 0`` and cached frozen-part
    outputs otherwise.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    start: int
    num_classes: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: torch.Tensor) -> LocalData:
        return LocalData(self.inputs[indices], self.labels[indices], self.start, self.num_classes)


def site_seed(run_seed: int, round: int, site: str) -> int:
    """A distinct, reproducible random stream per (run seed, round, site)."""
    return zlib.crc32(f"{run_seed}/{round}/{site}".encode())


def local_split_indices(labels: np.ndarray, fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a site's ``(train, evaluation)`` parts, stratified by label."""
    if fraction <= 0 or len(labels) < 2:
        return np.arange(len(labels)), np.arange(0)
    return stratified_split(labels, fraction, seed=seed)


def local_split(data: LocalData, labels: np.ndarray, fraction: float, *, seed: int) -> tuple[LocalData, LocalData]:
    """Split a site's data into ``(train, evaluation)``, stratified by label."""
    rest, held = local_split_indices(labels, fraction, seed=seed)
    return data.subset(torch.as_tensor(rest)), data.subset(torch.as_tensor(held))


def divergence_cause(cfg: FedConfig, *, server: bool, private: bool, lr: float | None = None) -> str:
    """The likely cause of divergence under ``cfg``, in words, for error messages.

    Parameters
    ----------
    cfg : FedConfig
        The run's configuration.
    server : bool
        The global model diverged (the server's step counts too), not one site's training.
    private : bool
        The training ran DP-SGD (its clipping bound is a likely cause too).
    lr : float, optional
        The site learning rate in use (default: the config's ``lr``).
    """
    rates = [f"`lr` = {cfg.lr if lr is None else lr:g} with {cfg.optimizer}"]
    if server and cfg.strategy in ("fedavgm", "fedadam", "fedyogi"):
        rates.append(f"`server-lr` = {cfg.server_learning_rate():g} with {cfg.strategy}")
    text = f"a learning rate too high for these settings ({'; '.join(rates)})"
    if private:
        text += f", or a clipping bound (`max-grad-norm` = {cfg.max_grad_norm:g}) too large for it"
    if not private and cfg.optimizer == "sgd" and cfg.lr >= 0.1:
        text += "; the DP-tuned lr without DP-SGD's clipping does this: `--experiment non-private` has the settings for dp = false"
    if server and cfg.strategy == "fedavg":
        text += "; or poisoned updates from some sites, which a mean follows (fedmedian or fedtrimmedavg limit their pull)"
    return text


class _DivergenceWatch:
    """Stops local training that has blown up (``divergence-factor``; 0 = never).

    Without DP: when a batch's mean loss is non-finite or passes ``divergence-factor``
    times the first batch's (or chance level, ln(classes), if higher: a well-trained
    model's small first loss must not make an ordinary batch look like divergence).
    Under DP-SGD the losses are exact statistics of private images, and stopping on
    them would tell the server something DP does not cover; there the watch looks only
    at the weights after each step (non-finite), which are DP-SGD's own outputs.
    """

    def __init__(self, cfg: FedConfig, *, lr: float, num_classes: int, private: bool) -> None:
        self.factor, self.private, self.chance = cfg.divergence_factor, private, math.log(max(num_classes, 2))
        self.first: float | None = None
        self.cause = divergence_cause(cfg, server=False, private=private, lr=lr)

    def loss(self, value: float, step: int) -> None:
        if self.factor <= 0 or self.private:
            return
        if self.first is None:
            self.first = value
        limit = self.factor * max(self.first, self.chance)
        if not math.isfinite(value) or value > limit:
            raise TrainingDiverged(
                f"training diverged at step {step + 1}: batch loss {value:.4g}, past {self.factor:g} x the first batch's "
                f"{self.first:.4g} (divergence-factor). Likely cause: {self.cause}",
                steps=step,
            )

    def weights(self, params: list[nn.Parameter], step: int) -> None:
        if self.factor <= 0:
            return
        with torch.no_grad():
            finite = bool(torch.stack([p.isfinite().all() for p in params]).all())
        if not finite:
            raise TrainingDiverged(
                f"training diverged: the weights turned non-finite at step {step}. Likely cause: {self.cause}", steps=step
            )


def local_steps(num_examples: int, *, batch_size: int, epochs: int, min_steps: int = 0) -> int:
    """Optimiser steps of one non-private local round: ``epochs`` passes, at least ``min_steps``.

    A pass is ``ceil(num_examples / batch_size)`` batches (the last one may be short);
    steps beyond the passes come from further passes over freshly shuffled data, the
    last of them cut short.
    """
    return max(epochs * math.ceil(num_examples / batch_size), min_steps)


@dataclass(frozen=True)
class TrainStats:
    loss: float
    accuracy: float
    num_examples: int
    steps: int
    seconds: float


class Task:
    """A :class:`FedModel` under a fine-tune policy, with its preprocessing.

    ``transform`` is the backbone's :class:`ImageTransform` at the config's
    ``image-size``: training (under ``augment``), evaluation, prediction, the feature
    cache and explanation all bring images to the model through it.

    Parameters
    ----------
    cfg : FedConfig
        The run configuration.
    num_classes : int
        Size of the classifier.
    """

    def __init__(self, cfg: FedConfig, num_classes: int) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        spec = get_backbone(cfg.backbone)
        # Seeded so that a randomly initialised frozen part (pretrained = false) is
        # still identical at the server and every site.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model: FedModel = create_model(
                cfg.backbone, num_classes=num_classes, pretrained=cfg.pretrained, weights_path=cfg.weights_path or None
            )
            self.num_classes = num_classes
            self.policy = parse_policy(cfg.policy)
            self.cut = apply_policy(self.model, self.policy)
            if cfg.lora_rank:  # seeded too: server and sites start from the same adapters
                apply_low_rank(self.model, self.cut, cfg.lora_rank)
        for module in self.head.modules():
            if isinstance(module, nn.Dropout):
                module.p = cfg.dropout
        self.model.to(self.device)
        if self.device.type == "cpu":
            # Depthwise convolutions run ~1.5x faster channels-last on CPU.
            self.model.to(memory_format=torch.channels_last)
        self.augment = parse_augment(cfg.augment)
        self.transform: ImageTransform = spec.transforms(image_size=cfg.image_size)
        weights = sha256_of(cfg.weights_path) if cfg.weights_path else "default-weights"
        self.model_id = f"{cfg.backbone}|{weights if cfg.pretrained else f'random-seed-{cfg.seed}'}"

    # ---- parameters that travel ---------------------------------------------
    @property
    def head(self) -> nn.Sequential:
        """The trainable stages as one module (what DP-SGD wraps)."""
        return self.model.stages[self.cut :]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A copy (never a view) of the parameters that travel, on the CPU."""
        return {k: v.detach().to("cpu", copy=True) for k, v in trainable_state_dict(self.model).items()}

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable(self.model, state)

    def full_model_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.model.state_dict().values())

    # ---- data ----------------------------------------------------------------
    def prepare(self, images: ImageSet, *, for_training: bool) -> LocalData:
        """Cache the frozen part's outputs when that is exact; else keep raw images.

        Features are exact for evaluation always, and for training when no
        augmentation is configured.
        """
        if not self._uses_cache(for_training):
            return LocalData(images.images, images.labels, 0, self.num_classes)
        feats = cached_features(
            self.model, self.cut, images, self.transform, model_id=self.model_id, cache_dir=self._cache_dir, device=self.device
        )
        return LocalData(feats, images.labels, self.cut, self.num_classes)

    def needs_feature_pass(self, images: ImageSet, *, for_training: bool) -> bool:
        """Whether :meth:`prepare` would compute features rather than read them from the cache."""
        if not self._uses_cache(for_training):
            return False
        path = feature_cache_path(self._cache_dir, model_id=self.model_id, stop=self.cut, transform=self.transform, images=images)
        return not path.is_file()

    def _uses_cache(self, for_training: bool) -> bool:
        return self.cfg.feature_cache and self.cut > 0 and not (for_training and self.augment.any)

    @property
    def _cache_dir(self) -> str | Path:
        return self.cfg.cache_dir or default_cache_dir()

    def _enter(self, x: torch.Tensor, start: int, *, train: bool, generator: torch.Generator | None) -> torch.Tensor:
        """Bring a batch to the input of the trainable part."""
        if start > 0:  # the frozen part's cached outputs (start == self.cut); 0 = raw images, even when cut is 0
            return x.to(self.device, non_blocking=True)
        x = (self.augment.apply(x, transform=self.transform, generator=generator) if train else self.transform(x)).to(self.device)
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            return self.model.forward_until(x, self.cut)

    # ---- training and evaluation ----------------------------------------------
    def train(
        self,
        data: LocalData,
        *,
        epochs: int,
        seed: int,
        lr: float | None = None,
        proximal_mu: float = 0.0,
        min_steps: int = 0,
        dp: DPSGD | None = None,
        dp_seed: int | None = None,
    ) -> TrainStats:
        """Local training of the trainable part, private when ``dp`` is given.

        Parameters
        ----------
        data : LocalData
            Site training data (from :meth:`prepare`).
        epochs : int
            Passes over ``data`` (with DP-SGD: ``epochs x int(1/q)`` Poisson batches).
        seed : int
            Seeds shuffling, augmentation and (unless secure) DP sampling and noise.
        lr : float, optional
            Learning rate for this call (default: the config's ``lr``).
        proximal_mu : float
            FedProx: pulls weights towards their value at the start of the call.
            Applied as a decoupled proximal step after each optimiser step, which
            needs no per-sample gradient and so composes with DP-SGD.
        min_steps : int
            Non-private training only: take at least this many optimiser steps
            (:func:`local_steps`), so that a small site does not stop after a few.
        dp : DPSGD, optional
            The DP-SGD mechanism; ``None`` trains without privacy.
        dp_seed : int, optional
            Seeds DP sampling and noise (reproducible experiments only). Default:
            fresh OS entropy, so nobody who knows the run config can rebuild the noise.
        """
        import time

        if len(data) == 0:
            raise ValueError("no training data")
        if dp is not None and min_steps > 0:
            # DP-SGD's steps are planned and accounted before training (epochs x int(1/q)).
            raise ValueError("min_steps applies to non-private training only; DP-SGD takes the steps its plan accounts for")
        cfg = self.cfg
        generator = torch.Generator().manual_seed(seed)
        params = [p for p in self.head.parameters() if p.requires_grad]
        anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
        lr = cfg.lr if lr is None else lr
        optimizer = self.make_optimizer(params, lr)
        n = len(data)
        if dp is None:
            batches = self._shuffled(n, local_steps(n, batch_size=cfg.batch_size, epochs=epochs, min_steps=min_steps), generator)
            stepper: Stepper = PlainStepper(optimizer)
        else:
            sampling, noise = dp.generators(dp_seed, self.device)
            batches = dp.batches(n, epochs=epochs, generator=sampling)
            stepper = dp.stepper(self.head, optimizer, noise)
        train_mode(self.model, False)
        train_mode(self.head, True)  # frozen stages stay in eval mode, as when cached
        started = time.perf_counter()
        total_loss, correct, seen, steps = 0.0, 0, 0, 0
        contiguous = getattr(stepper, "contiguous", False)
        watch = _DivergenceWatch(cfg, lr=lr, num_classes=self.num_classes, private=dp is not None)
        try:
            for idx in batches:
                if len(idx) == 0:  # an empty Poisson batch still takes a (noise-only) step
                    stepper.noise_only()
                    steps += 1
                    watch.weights(params, steps)
                    continue
                x = self._enter(data.inputs[idx], data.start, train=True, generator=generator)
                if contiguous:
                    x = x.contiguous()
                y = data.labels[idx].to(self.device)
                logits = self.head(x)
                loss = nn.functional.cross_entropy(logits, y, reduction="none")
                batch_loss = float(loss.detach().sum())
                watch.loss(batch_loss / len(idx), steps)
                stepper.step(loss)
                if anchor is not None:
                    with torch.no_grad():
                        for p, p0 in zip(params, anchor):
                            p.sub_(lr * proximal_mu * (p - p0))
                steps += 1
                watch.weights(params, steps)
                total_loss += batch_loss
                correct += int((logits.argmax(1) == y).sum())
                seen += len(idx)
        finally:
            stepper.close()
            train_mode(self.model, False)
        seen = max(seen, 1)
        return TrainStats(total_loss / seen, correct / seen, n, steps, time.perf_counter() - started)

    def _shuffled(self, n: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """``steps`` batches from successive shuffles of ``range(n)``."""
        taken = 0
        while taken < steps:
            order = torch.randperm(n, generator=generator)
            for i in range(0, n, self.cfg.batch_size)[: steps - taken]:
                taken += 1
                yield order[i : i + self.cfg.batch_size]

    def make_optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """The configured site optimiser over ``params``."""
        cfg = self.cfg
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def round_lr(self, round: int) -> float:
        """The site learning rate in (1-based) federated round ``round``."""
        return self.cfg.lr * self.cfg.lr_decay ** max(round - 1, 0)

    @torch.no_grad()
    def predict(self, data: LocalData, *, batch_size: int = 512) -> torch.Tensor:
        """Logits for every input (eval mode)."""
        train_mode(self.model, False)
        out = []
        for i in range(0, len(data), batch_size):
            x = self._enter(data.inputs[i : i + batch_size], data.start, train=False, generator=None)
            out.append(self.head(x).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.num_classes)

    def evaluate(self, data: LocalData) -> ClassificationReport:
        """All metrics of the current model on ``data``."""
        return classification_report(self.predict(data), data.labels, self.num_classes)
