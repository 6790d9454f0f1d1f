"""How far to trust an attribution method: faithfulness and the model-randomisation check.

*Faithfulness* (deletion / insertion, Petsiuk et al., 2018): remove the pixels a map
ranks highest first and watch the target probability fall (deletion: the faster the
better, low area under the curve); or start from a blank image and put them back
(insertion: the faster it recovers the better, high area). Both are compared with a
random ranking of the same pixels, so "0.0" means "no better than chance".

*Model randomisation* (Adebayo et al., 2018): the same method on the same images,
but with the model's weights re-drawn at random. A method that explains the model
must give different maps; a high rank correlation between the two means the maps
mostly show the image (edges, contrast), not what the model learnt, and the method
is flagged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["Faithfulness", "deletion_insertion", "random_ranking_maps", "randomized_copy", "rank_correlation", "SANITY_FLAG"]

FRACTIONS = np.linspace(0.0, 1.0, 11)
SANITY_FLAG = 0.5  # mean Spearman rho of trained vs random-model maps at or above this: flagged


@dataclass(frozen=True)
class Faithfulness:
    deletion_auc: float
    insertion_auc: float
    deletion_curve: list[float]
    insertion_curve: list[float]

    @property
    def score(self) -> float:
        """Insertion minus deletion area: 0 = no signal, higher = more faithful."""
        return self.insertion_auc - self.deletion_auc


@torch.no_grad()
def deletion_insertion(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, maps: torch.Tensor, *, batch_size: int = 64, seed: int = 0
) -> Faithfulness:
    """Mean deletion and insertion curves of ``maps`` over ``images``.

    Pixels are removed/inserted in all channels at once; "removed" means set to 0 in
    the model's input space (the dataset-mean grey). Pixels a map ties (e.g. the zeros of
    a clamped map) are taken in random order, not raster order.
    """
    n, _c, h, w = images.shape
    flat = maps.reshape(n, -1).double()
    jitter = torch.rand(flat.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) * 1e-9
    order = torch.argsort(flat + jitter * scale, dim=1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(h * w).expand(n, -1))
    ranks = ranks.reshape(n, 1, h, w)
    deletion, insertion = [], []
    for frac in FRACTIONS:
        top = ranks < int(round(frac * h * w))  # the top `frac` of pixels of each image
        deletion.append(_target_prob(model, images * ~top, targets, batch_size))
        insertion.append(_target_prob(model, images * top, targets, batch_size))
    d, i = np.stack(deletion, 1).mean(0), np.stack(insertion, 1).mean(0)
    return Faithfulness(float(np.trapezoid(d, FRACTIONS)), float(np.trapezoid(i, FRACTIONS)), d.round(4).tolist(), i.round(4).tolist())


def _target_prob(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, batch_size: int) -> np.ndarray:
    out = []
    for k in range(0, len(x), batch_size):
        probs = torch.softmax(model(x[k : k + batch_size]).float(), dim=1)
        out.append(probs.gather(1, targets[k : k + batch_size, None]).squeeze(1))
    return torch.cat(out).cpu().numpy()


def random_ranking_maps(shape: tuple[int, ...], *, seed: int) -> torch.Tensor:
    """Maps that rank pixels at random: the chance level of :func:`deletion_insertion`."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def randomized_copy(model: nn.Module, *, seed: int) -> nn.Module:
    """The same architecture with every learnt weight re-initialised at random.

    BatchNorm statistics stay (they describe the input, not what was learnt), so the
    random network still produces finite activations.
    """
    twin = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in twin.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            reset = getattr(module, "reset_parameters", None)
            if callable(reset) and any(True for _ in module.parameters(recurse=False)):
                reset()
    return twin.eval()


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Spearman's rho per image between maps ``a`` and ``b`` (``[N, H, W]``); 0 for a constant map."""
    ra = _ranks(a.reshape(len(a), -1).double())
    rb = _ranks(b.reshape(len(b), -1).double())
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    denom = ra.norm(dim=1) * rb.norm(dim=1)
    rho = (ra * rb).sum(1) / denom.clamp_min(1e-12)
    rho[denom == 0] = 0.0
    return rho.numpy()


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks along dim 1 (ties share their mean rank)."""
    out = torch.empty_like(x)
    for i, row in enumerate(x):
        values, inverse, counts = torch.unique(row, return_inverse=True, return_counts=True)
        ends = torch.cumsum(counts, 0).double()
        mean_rank = ends - (counts.double() - 1) / 2
        out[i] = mean_rank[inverse]
        del values
    return out
