"""Per-sample gradient clipping in one backward pass, for Linear and pointwise-conv heads.

DP-SGD needs ``sum_i clip(g_i)``: each example's gradient scaled to norm at most
``C``, then summed. Opacus' hook mode materialises every per-sample gradient
(batch x parameters floats) to get there; for a 1x1 convolution with 410 k weights
that costs ~6x a normal step on a CPU. For layers that are linear maps applied
at every spatial position (``nn.Linear``, 1x1 ``nn.Conv2d``), two classic tricks
make it nearly free:

* ghost norm (Goodfellow 2015; Li et al. 2022): with layer input ``a`` (positions x
  d_in) and output gradient ``g`` (positions x d_out) of one example,
  ``||g^T a||_F^2 = sum((g g^T) * (a a^T))`` — two small position x position Gram
  matrices instead of a d_out x d_in gradient per example;
* book-keeping (Bu et al. 2023): once the clip factors ``c_i`` are known, the clipped
  sum is ``(c * g)^T a`` — one matrix product, the same cost as the ordinary
  weight gradient.

The backward pass only computes gradients with respect to layer *outputs* (no
weight gradient is formed twice). Noise, scaling and the optimiser step stay with
Opacus' :class:`~opacus.optimizers.DPOptimizerFastGradientClipping`, which expects
exactly this clipped sum in ``p.grad``. Correctness is tested against Opacus'
own per-sample gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..models import is_pointwise_conv

__all__ = ["BookKeepingClipper", "supports_fast_clipping"]


def _trainable_direct(m: nn.Module) -> list[nn.Parameter]:
    return [p for p in m.parameters(recurse=False) if p.requires_grad]


def supports_fast_clipping(module: nn.Module) -> bool:
    """True when every trainable parameter sits in a Linear or a pointwise (1x1) conv."""
    layers = [m for m in module.modules() if _trainable_direct(m)]
    if not layers or not all(type(m) is nn.Linear or is_pointwise_conv(m) for m in layers):
        return False
    params = [p for m in layers for p in _trainable_direct(m)]
    return len({id(p) for p in params}) == len(params)  # no weight shared between layers


class BookKeepingClipper:
    """Hooks on ``module`` that turn a per-sample loss into clipped, summed gradients.

    Parameters
    ----------
    module : nn.Module
        The trainable part; :func:`supports_fast_clipping` must hold.
    max_grad_norm : float
        Per-sample clipping bound ``C`` (over all parameters together).

    Notes
    -----
    Use as a context manager (hooks are removed on exit) and call
    :meth:`backward` instead of ``loss.backward()``.
    """

    def __init__(self, module: nn.Module, *, max_grad_norm: float) -> None:
        if not supports_fast_clipping(module):
            raise ValueError("book-keeping clipping needs every trainable layer to be Linear or a 1x1 Conv2d, with no shared weights")
        self.max_grad_norm = float(max_grad_norm)
        # Linear and pointwise Conv2d only (supports_fast_clipping checks it before this is built).
        self.layers: list[nn.Linear | nn.Conv2d] = [m for m in module.modules() if _trainable_direct(m)]  # type: ignore[misc]
        self._io: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self._versions: dict[nn.Module, int] = {}
        self._active = True
        self._handles = [m.register_forward_hook(self._capture) for m in self.layers]

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Run the module without recording (e.g. a non-private step in a benchmark)."""
        self._active = False
        try:
            yield
        finally:
            self._active = True

    def _capture(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not self._active:
            return
        if module in self._io:  # a layer applied twice per step needs summed per-sample terms
            raise RuntimeError(f"{type(module).__name__} ran twice in one forward pass; use dp-mode = hooks for this model")
        self._io[module] = (inputs[0].detach(), output)
        self._versions[module] = output._version

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._io.clear()
        self._versions.clear()

    def __enter__(self) -> BookKeepingClipper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _as_rows(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
        """Conv ``(B, C, H, W)`` or Linear ``(B, ..., C)`` -> ``(B, positions, C)``."""
        if isinstance(module, nn.Conv2d):
            return t.flatten(2).transpose(1, 2)
        return t.reshape(t.shape[0], -1, t.shape[-1])

    def backward(self, per_sample_loss: torch.Tensor) -> torch.Tensor:
        """Set ``p.grad = sum_i clip(grad of per_sample_loss[i])`` for every trainable parameter.

        Returns
        -------
        torch.Tensor
            The unclipped per-sample gradient norms (for diagnostics).
        """
        batch = per_sample_loss.shape[0]
        if batch == 0:  # an empty Poisson batch: the step is pure noise
            for m in self.layers:
                for p in _trainable_direct(m):
                    p.grad = torch.zeros_like(p)
            self._io.clear()
            self._versions.clear()
            return per_sample_loss.new_zeros(0)
        outputs = [self._io[m][1] for m in self.layers]
        if any(out._version != self._versions[m] for m, out in zip(self.layers, outputs)):
            raise RuntimeError("a layer's output was modified in place after it ran; use out-of-place activations or dp-mode = hooks")
        grads = torch.autograd.grad(per_sample_loss.sum(), outputs)
        rows = []
        sq_norms = per_sample_loss.new_zeros(batch, dtype=torch.float32)
        for m, g in zip(self.layers, grads):
            a = self._as_rows(m, self._io[m][0]).float()
            g = self._as_rows(m, g).float()
            positions = a.shape[1]
            if m.weight.requires_grad:
                if positions == 1:
                    sq_norms += g.square().sum((1, 2)) * a.square().sum((1, 2))
                elif positions * (a.shape[2] + g.shape[2]) <= a.shape[2] * g.shape[2]:
                    sq_norms += (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))).sum((1, 2))
                else:  # many positions: the per-sample gradient is the smaller object
                    sq_norms += torch.bmm(g.transpose(1, 2), a).square().sum((1, 2))
            if m.bias is not None and m.bias.requires_grad:
                sq_norms += g.sum(1).square().sum(1)
            rows.append((m, a, g))
        norms = sq_norms.sqrt()
        factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for m, a, g in rows:
            gc = g * factor[:, None, None]
            if m.weight.requires_grad:
                w = gc.reshape(-1, gc.shape[2]).T @ a.reshape(-1, a.shape[2])
                m.weight.grad = w.reshape(m.weight.shape).to(m.weight.dtype)
            if m.bias is not None and m.bias.requires_grad:
                m.bias.grad = gc.sum((0, 1)).to(m.bias.dtype)
        self._io.clear()
        self._versions.clear()
        return norms
