"""Partitioners: split a labelled pool across simulated sites, reproducibly.

Each partitioner is a function ``(labels, num_sites, rng, cfg) -> list of index
arrays`` registered by name; adding one means adding a function, not an ``if``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..config import FedConfig
from ..errors import ConfigError

__all__ = ["partition", "class_counts", "PARTITIONERS", "MIN_SITE_IMAGES"]

# A site needs a few images to train and to hold some back for local evaluation.
MIN_SITE_IMAGES = 2

Partitioner = Callable[[np.ndarray, int, np.random.Generator, FedConfig], list[np.ndarray]]
PARTITIONERS: dict[str, Partitioner] = {}


def _register(name: str) -> Callable[[Partitioner], Partitioner]:
    def wrap(fn: Partitioner) -> Partitioner:
        if name in PARTITIONERS:
            raise ValueError(f"partitioner {name!r} is already registered")
        PARTITIONERS[name] = fn
        return fn

    return wrap


@_register("iid")
def _iid(labels: np.ndarray, num_sites: int, rng: np.random.Generator, cfg: FedConfig) -> list[np.ndarray]:
    return list(np.array_split(rng.permutation(len(labels)), num_sites))


def _split_by_proportions(idx: np.ndarray, proportions: np.ndarray) -> list[np.ndarray]:
    cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(int)
    return np.split(idx, cuts)


@_register("dirichlet")
def _dirichlet(labels: np.ndarray, num_sites: int, rng: np.random.Generator, cfg: FedConfig) -> list[np.ndarray]:
    """Label skew: each class is spread over sites with Dirichlet(alpha) proportions.

    Redrawn (up to 100 times) until every site has ``MIN_SITE_IMAGES`` images, as in
    the usual recipe (Hsu et al., 2019); small alpha gives few classes per site.
    """
    classes = np.unique(labels)
    for _attempt in range(100):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            for site, chunk in enumerate(_split_by_proportions(idx, rng.dirichlet([cfg.alpha] * num_sites))):
                parts[site].append(chunk)
        sites = [np.concatenate(p) for p in parts]
        if min(len(s) for s in sites) >= MIN_SITE_IMAGES:
            return sites
    raise ConfigError(
        f"a Dirichlet partition with alpha={cfg.alpha} kept leaving a site with fewer than "
        f"{MIN_SITE_IMAGES} images ({len(labels)} images, {num_sites} sites); raise `alpha` or lower `num-sites`"
    )


@_register("pathological")
def _pathological(labels: np.ndarray, num_sites: int, rng: np.random.Generator, cfg: FedConfig) -> list[np.ndarray]:
    """Each site holds exactly ``classes-per-site`` classes; each class is shared evenly by its holders."""
    classes = rng.permutation(np.unique(labels))
    k = cfg.classes_per_site
    if k > len(classes):
        raise ConfigError(f"`classes-per-site` = {k} but the data has only {len(classes)} classes")
    if num_sites * k < len(classes):
        raise ConfigError(
            f"{num_sites} sites x {k} classes per site cannot cover all {len(classes)} classes; raise `classes-per-site` or `num-sites`"
        )
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for site in range(num_sites):
        for j in range(k):
            holders[int(classes[(site * k + j) % len(classes)])].append(site)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
    for c, sites in holders.items():
        idx = rng.permutation(np.flatnonzero(labels == c))
        for site, chunk in zip(sites, np.array_split(idx, len(sites))):
            parts[site].append(chunk)
    return [np.concatenate(p) for p in parts]


@_register("quantity")
def _quantity(labels: np.ndarray, num_sites: int, rng: np.random.Generator, cfg: FedConfig) -> list[np.ndarray]:
    """Size skew: IID labels, site sizes in Dirichlet(alpha) proportions (at least the minimum each)."""
    n = len(labels)
    spare = n - MIN_SITE_IMAGES * num_sites
    sizes = MIN_SITE_IMAGES + np.floor(rng.dirichlet([cfg.alpha] * num_sites) * spare).astype(int)
    sizes[np.argmax(sizes)] += n - sizes.sum()
    return list(np.split(rng.permutation(n), np.cumsum(sizes)[:-1]))


def partition(labels: np.ndarray, cfg: FedConfig) -> list[np.ndarray]:
    """Split pool indices across ``cfg.num_sites`` sites with ``cfg.partition``.

    The result depends only on ``labels`` and the config (seeded by ``cfg.seed``).

    Raises
    ------
    ConfigError
        When the pool is too small for the number of sites, or the scheme's
        parameters cannot be met.
    """
    labels = np.asarray(labels)
    needed = MIN_SITE_IMAGES * cfg.num_sites
    if len(labels) < needed:
        raise ConfigError(
            f"{cfg.num_sites} sites need at least {needed} training images ({MIN_SITE_IMAGES} each) "
            f"but the pool has {len(labels)}; lower `num-sites` or add data"
        )
    rng = np.random.default_rng([cfg.seed, 7919])
    sites = PARTITIONERS[cfg.partition](labels, cfg.num_sites, rng, cfg)
    sites = [np.sort(s.astype(np.int64)) for s in sites]
    assert sum(len(s) for s in sites) == len(labels)
    return sites


def class_counts(labels: np.ndarray, sites: list[np.ndarray], num_classes: int) -> list[list[int]]:
    """Per-site class histogram: ``counts[site][class]``."""
    return [np.bincount(np.asarray(labels)[s], minlength=num_classes).tolist() for s in sites]
