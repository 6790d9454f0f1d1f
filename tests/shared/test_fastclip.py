"""Book-keeping clipping against Opacus' own per-sample gradients."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from fedlens.shared.privacy.fastclip import BookKeepingClipper, supports_fast_clipping


def _head(positions_side: int, d_in: int = 6, d_mid: int = 5) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    head = nn.Sequential(
        nn.Conv2d(d_in, d_mid, 1, bias=False),
        nn.BatchNorm2d(d_mid).eval().requires_grad_(False),  # frozen, as fedlens keeps it
        nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(d_mid, 3),
    )
    x = torch.randn(7, d_in, positions_side, positions_side)
    y = torch.randint(0, 3, (7,))
    return head, x, y


def _reference(head: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> dict[str, torch.Tensor]:
    """Clip-and-sum from Opacus' materialised per-sample gradients (hooks mode)."""
    gsm = GradSampleModule(head, loss_reduction="sum")
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    params = {n: p for n, p in head.named_parameters() if p.requires_grad}
    per_sample = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in params.values()], 1).norm(dim=1)
    factor = (clip / (per_sample + 1e-6)).clamp(max=1.0)
    out = {n: torch.einsum("i,i...->...", factor, p.grad_sample) for n, p in params.items()}
    gsm._close()
    for p in params.values():
        p.grad, p.grad_sample = None, None
    return out


# One position; ghost norm (4 positions: 4 x 28 <= 16 x 12); per-sample branch (64 positions).
@pytest.mark.parametrize("side", [1, 2, 8])
def test_clipped_sum_matches_opacus_per_sample_gradients(side):
    head, x, y = _head(side, d_in=16, d_mid=12)
    with BookKeepingClipper(head, max_grad_norm=1e9) as clipper:  # find the norms first
        norms = clipper.backward(nn.functional.cross_entropy(head(x), y, reduction="none"))
    clip = float(norms.median())  # about half the samples get clipped
    assert (norms > clip).any() and (norms < clip).any()
    expected = _reference(head, x, y, clip)
    with BookKeepingClipper(head, max_grad_norm=clip) as clipper:
        clipper.backward(nn.functional.cross_entropy(head(x), y, reduction="none"))
    for name, p in head.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6)
    assert not head[0]._forward_hooks  # hooks removed on exit


def test_empty_batch_gives_zero_gradients():
    head, x, y = _head(3)
    with BookKeepingClipper(head, max_grad_norm=1.0) as clipper:
        norms = clipper.backward(nn.functional.cross_entropy(head(x[:0]), y[:0], reduction="none"))
    assert norms.numel() == 0
    assert all(torch.count_nonzero(p.grad) == 0 for p in head.parameters() if p.requires_grad)


def test_only_linear_and_pointwise_layers_qualify():
    head, _, _ = _head(3)
    assert supports_fast_clipping(head)
    depthwise = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.LazyLinear(2))
    assert not supports_fast_clipping(depthwise)
    assert not supports_fast_clipping(nn.Sequential(nn.Conv2d(4, 4, 3)))
    frozen = nn.Sequential(nn.Conv2d(4, 4, 3).requires_grad_(False), nn.Flatten(), nn.Linear(4, 2))
    assert supports_fast_clipping(frozen)  # frozen layers of any kind are fine
    with pytest.raises(ValueError, match="Linear or a 1x1"):
        BookKeepingClipper(depthwise, max_grad_norm=1.0)


def test_patterns_it_cannot_handle_are_refused_not_miscomputed():
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight  # one weight in two layers
    assert not supports_fast_clipping(nn.Sequential(first, nn.ReLU(), second))

    twice = nn.Linear(4, 4)
    with BookKeepingClipper(twice, max_grad_norm=1.0) as clipper:
        x = torch.randn(3, 4)
        with pytest.raises(RuntimeError, match="twice"):
            twice(twice(x))

    inplace = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    with BookKeepingClipper(inplace, max_grad_norm=1.0) as clipper:
        loss = nn.functional.cross_entropy(inplace(torch.randn(3, 4)), torch.tensor([0, 1, 0]), reduction="none")
        with pytest.raises(RuntimeError, match="in place"):
            clipper.backward(loss)
