"""DP-SGD for one stretch of local training: Poisson sampling, per-sample clipping, noise.

:class:`DPSGD` describes the mechanism (noise multiplier, clipping bound, sample
rate) and hands :meth:`shared.task.Task.train` two things: the Poisson batches
(Opacus' ``UniformWithReplacementSampler``) and a *stepper* that turns a batch's
per-sample losses into a private optimiser step. Noise, its scale and the
optimiser wrapping are Opacus' (``DPOptimizer`` / ``DPOptimizerFastGradientClipping``);
the per-sample gradient method is chosen per trainable part:

``book-keeping``
    Ghost norms + book-keeping (:mod:`.fastclip`): one backward pass, no per-sample
    gradient ever materialised. Exact for Linear and 1x1-conv layers, which is
    what the ``head`` and ``last-1`` policies train on EfficientNet-Lite0.
``hooks`` / ``functorch``
    Opacus' ``GradSampleModule``; any layer Opacus supports (depthwise convs of
    deeper policies, ResNet blocks).
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ..errors import ConfigError, DataError
from .fastclip import BookKeepingClipper, supports_fast_clipping

__all__ = [
    "DPSGD",
    "Stepper",
    "PlainStepper",
    "resolve_dp_mode",
    "steps_per_epoch",
    "sample_rate_for",
    "secure_generator",
    "update_norm_bound",
]

_log = logging.getLogger("fedlens.privacy.dpsgd")

# What Opacus says when secure_mode is off; repeated in fedlens' own log so it
# stays visible where Python's once-per-process warning filter would hide it.
INSECURE_RNG_WARNING = (
    "Secure RNG turned off (secure-rng = false): DP noise and sampling come from torch's PRNG, "
    "seeded from the operating system's entropy at the site (never from the run config), not from "
    "a cryptographic generator. Set secure-rng = true for production runs (Opacus secure_mode)."
)


def sample_rate_for(batch_size: int, num_examples: int) -> float:
    """Poisson sampling rate giving ``batch_size`` images per step on average.

    Raises
    ------
    DataError
        When the site has no more images than one batch: DP-SGD would then see every
        image at every step (no privacy amplification), so the run refuses instead.
    """
    if num_examples <= batch_size:
        raise DataError(
            f"DP-SGD needs more training images than `batch-size` ({batch_size}), but this site has "
            f"{num_examples}: lower `batch-size` (e.g. {max(1, num_examples // 8)}) or add images"
        )
    return batch_size / num_examples


def steps_per_epoch(sample_rate: float) -> int:
    """Steps of one local epoch at ``sample_rate`` (Opacus' convention, ``int(1/q)``)."""
    return max(1, int(1.0 / sample_rate))


# Tail of the high-probability bounds in update_norm_bound: each fails with probability at most
# exp(-TAIL**2 / 2) = 1.3e-14 per site and round, so an honest update is refused essentially never.
_TAIL = 8.0


def update_norm_bound(
    *,
    lr: float,
    momentum: float,
    max_grad_norm: float,
    noise_multiplier: float,
    batch_size: int,
    num_examples: int,
    epochs: int,
    num_params: int,
) -> float:
    """How far (L2) one round of DP-SGD with SGD can move the trainable parameters.

    A round runs ``T = epochs x int(n / B)`` steps (``n`` = ``num_examples``, ``B`` =
    ``batch_size``, Poisson rate ``q = B / n``). Step ``t`` feeds the optimiser
    ``g_t = (s_t + xi_t) / B`` with ``s_t`` the sum of the batch's clipped gradients
    (``||s_t|| <= C |b_t|``) and ``xi_t ~ N(0, (sigma C)^2 I_d)``. SGD with momentum
    ``beta`` moves the parameters by ``-lr sum_t w_t g_t`` with
    ``w_t = (1 - beta^(T-t+1)) / (1 - beta)`` in ``[1, 1 / (1 - beta)]``, so

    * the clipped part is at most ``lr / (1 - beta) x C / B x sum_t |b_t|``, and
      ``sum_t |b_t| ~ Binomial(n T, q)`` (mean ``T B``) stays below
      ``T B + 8 sqrt(T B) + 64`` but with probability 1.3e-14 (Chernoff);
    * the noise part is exactly Gaussian, with per-coordinate std at most
      ``lr sigma C / B x sqrt(T) / (1 - beta)``, and its norm stays below that std
      times ``sqrt(d) + 8`` but with probability 1.3e-14 (Gaussian concentration).

    The bound is their sum. FedProx's proximal step (``lr x mu <= 2``) only pulls the
    parameters back, and decaying learning rates only shrink steps, so both stay within
    it at the first round's ``lr``. Weight decay and Adam are not covered.

    Parameters
    ----------
    lr, momentum : float
        The site optimiser's learning rate (the largest of the run) and SGD momentum.
    max_grad_norm, noise_multiplier : float
        Clipping bound ``C`` and noise multiplier ``sigma`` of the round.
    batch_size, num_examples, epochs : int
        Expected Poisson batch ``B``, the site's training images ``n``, local epochs.
    num_params : int
        Trainable numbers ``d``.

    Returns
    -------
    float
        The bound on the L2 norm of (trained - global) for an honest site.
    """
    steps = epochs * steps_per_epoch(batch_size / num_examples)
    mean = steps * batch_size
    sampled = mean + _TAIL * math.sqrt(mean) + _TAIL**2
    scale = lr / (1.0 - momentum) * max_grad_norm / batch_size
    return scale * (sampled + noise_multiplier * math.sqrt(steps) * (math.sqrt(num_params) + _TAIL))


def resolve_dp_mode(module: nn.Module, mode: str) -> str:
    """The per-sample gradient method for ``module``: ``auto`` picks the fastest exact one."""
    if mode == "auto":
        return "book-keeping" if supports_fast_clipping(module) else "hooks"
    if mode == "book-keeping" and not supports_fast_clipping(module):
        raise ConfigError(
            "`dp-mode = book-keeping` only handles trainable Linear and 1x1-conv layers; this policy trains "
            "others: use `dp-mode = auto` (or hooks / functorch)"
        )
    return mode


def secure_generator() -> torch.Generator:
    """A cryptographically secure generator (torchcsprng), as Opacus' secure_mode uses.

    Raises
    ------
    ConfigError
        When torchcsprng is not installed.
    """
    try:
        import torchcsprng as csprng
    except ImportError:
        raise ConfigError(
            "`secure-rng = true` needs the torchcsprng package (Opacus' secure random generator), which "
            "is not installed; its last release targets torch 1.x, so on this stack it needs a build "
            "from source matching torch. Until then run with secure-rng = false (noise seeded from OS "
            "entropy at each site)."
        ) from None
    return csprng.create_random_device_generator("/dev/urandom")


_warned = False


class Stepper(Protocol):
    """Turns the per-sample losses of one batch into an optimiser step."""

    def step(self, per_sample_loss: torch.Tensor) -> None: ...

    def noise_only(self) -> None:
        """An empty Poisson batch: a step with zero clipped sum (noise only)."""

    def close(self) -> None: ...


class PlainStepper:
    """Non-private: mean loss, backward, step."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self, per_sample_loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        per_sample_loss.mean().backward()
        self.optimizer.step()

    def noise_only(self) -> None:
        pass  # non-private training never sees an empty batch

    def close(self) -> None:
        pass


class _BookKeepingStepper:
    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, dp: DPSGD, generator: torch.Generator | None) -> None:
        from opacus.optimizers import DPOptimizerFastGradientClipping

        self.clipper = BookKeepingClipper(module, max_grad_norm=dp.max_grad_norm)
        self.optimizer = DPOptimizerFastGradientClipping(optimizer, **dp.optimizer_kwargs(generator))

    def step(self, per_sample_loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.clipper.backward(per_sample_loss)
        self.optimizer.step()

    def suspended(self) -> contextlib.AbstractContextManager[None]:
        """Forward/backward passes that must not be recorded (benchmarks)."""
        return self.clipper.suspended()

    def noise_only(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for m in self.clipper.layers:
            for p in m.parameters(recurse=False):
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
        self.optimizer.step()

    def close(self) -> None:
        self.clipper.close()


class _OpacusStepper:
    def __init__(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, dp: DPSGD, generator: torch.Generator | None, *, functorch: bool
    ) -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        # Opacus' conv per-sample gradients (unfold via as_strided) assume contiguous
        # NCHW tensors: channels-last (fedlens' CPU layout) gives wrong gradients.
        self.contiguous = True
        self._restore_channels_last = any(
            p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in module.parameters()
        )
        module.to(memory_format=torch.contiguous_format)
        self._inner = module
        # Per-sample gradients of the summed loss; DPOptimizer divides the noisy
        # clipped sum by the expected batch size ("mean"), as DP-SGD prescribes.
        self.module = GradSampleModule(module, batch_first=True, loss_reduction="sum", force_functorch=functorch)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = DPOptimizer(optimizer, **dp.optimizer_kwargs(generator))

    def step(self, per_sample_loss: torch.Tensor) -> None:
        per_sample_loss.sum().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Forward/backward passes that must not be recorded (benchmarks)."""
        self.module.disable_hooks()
        try:
            yield
        finally:
            self.module.enable_hooks()

    def noise_only(self) -> None:
        for p in self.params:  # a zero per-sample gradient: clipping and summing give 0
            p.grad_sample = torch.zeros((1, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]  # Opacus sets it
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self.module._close()
        if self._restore_channels_last:
            self._inner.to(memory_format=torch.channels_last)


@dataclass(frozen=True, kw_only=True)
class DPSGD:
    """One DP-SGD mechanism, fixed for a whole run.

    Parameters
    ----------
    noise_multiplier : float
        Gaussian noise std over the clipping bound (calibrated once per run).
    max_grad_norm : float
        Per-sample clipping bound ``C``.
    sample_rate : float
        Poisson sampling probability of each image at each step.
    expected_batch_size : int
        Divides the noisy clipped sum (``sample_rate x images``).
    secure_rng : bool
        Use a cryptographically secure generator for sampling and noise (no default:
        the insecure choice is made explicitly, and logged).
    mode : str
        ``auto`` (default: the fastest exact method), ``book-keeping``, ``hooks`` or
        ``functorch``; all give the same guarantee.
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch_size: int
    secure_rng: bool
    mode: str = "auto"

    def __post_init__(self) -> None:
        if not self.noise_multiplier >= 0 or not self.max_grad_norm > 0 or not 0 < self.sample_rate < 1:
            raise ConfigError(
                f"invalid DP-SGD parameters: noise multiplier {self.noise_multiplier} (>= 0), "
                f"clipping bound {self.max_grad_norm} (> 0), sample rate {self.sample_rate} (in (0, 1))"
            )

    def optimizer_kwargs(self, generator: torch.Generator | None) -> dict[str, object]:
        """Arguments of Opacus' DP optimisers: noise on the clipped sum, divided by the expected batch."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "expected_batch_size": self.expected_batch_size,
            "loss_reduction": "mean",
            "generator": generator,
            "secure_mode": self.secure_rng,
        }

    def generators(self, seed: int | None, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
        """``(sampling, noise)`` randomness.

        Secure (torchcsprng) with ``secure_rng``; else torch generators seeded from OS
        entropy, or from ``seed`` when given (reproducible experiments only: whoever
        knows the seed can rebuild the noise).
        """
        if self.secure_rng:
            return secure_generator(), secure_generator()
        global _warned
        if not _warned:  # once per process: every site process says it
            _warned = True
            _log.warning("%s", INSECURE_RNG_WARNING)
        if seed is None:
            seed = secrets.randbits(62)
        noise = torch.Generator(device=device).manual_seed(seed + 1)
        return torch.Generator().manual_seed(seed), noise

    def batches(self, num_examples: int, *, epochs: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """Poisson-sampled index batches: ``epochs x int(1/q)`` of them."""
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        sampler = UniformWithReplacementSampler(
            num_samples=num_examples, sample_rate=self.sample_rate, generator=generator, steps=epochs * steps_per_epoch(self.sample_rate)
        )
        for indices in sampler:
            yield torch.as_tensor(indices, dtype=torch.long)

    def stepper(self, module: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> Stepper:
        """A private stepper over ``module``'s trainable parameters (close it afterwards)."""
        mode = resolve_dp_mode(module, self.mode)
        if mode == "book-keeping":
            return _BookKeepingStepper(module, optimizer, self, generator)
        return _OpacusStepper(module, optimizer, self, generator, functorch=mode == "functorch")
