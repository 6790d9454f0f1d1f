import numpy as np
import pytest

from fedlens.shared.config import FedConfig
from fedlens.shared.data.partition import MIN_SITE_IMAGES, PARTITIONERS, class_counts, partition
from fedlens.shared.errors import ConfigError

LABELS = np.repeat(np.arange(10), 100)


def _cfg(**kw):
    return FedConfig.from_mapping({k.replace("_", "-"): v for k, v in kw.items()})


@pytest.mark.parametrize("scheme", sorted(PARTITIONERS))
def test_every_image_goes_to_exactly_one_site(scheme):
    sites = partition(LABELS, _cfg(partition=scheme, num_sites=7))
    assert len(sites) == 7
    merged = np.sort(np.concatenate(sites))
    assert np.array_equal(merged, np.arange(len(LABELS)))
    assert min(len(s) for s in sites) >= MIN_SITE_IMAGES


@pytest.mark.parametrize("scheme", sorted(PARTITIONERS))
def test_partitions_are_reproducible_and_seeded(scheme):
    a = partition(LABELS, _cfg(partition=scheme, num_sites=5, seed=1))
    b = partition(LABELS, _cfg(partition=scheme, num_sites=5, seed=1))
    c = partition(LABELS, _cfg(partition=scheme, num_sites=5, seed=2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def _label_skew(sites):
    counts = np.array(class_counts(LABELS, sites, 10), dtype=float)
    shares = counts / counts.sum(1, keepdims=True)
    return float(np.abs(shares - 0.1).sum(1).mean())


def test_dirichlet_alpha_controls_label_skew():
    skewed = _label_skew(partition(LABELS, _cfg(partition="dirichlet", num_sites=10, alpha=0.1)))
    mild = _label_skew(partition(LABELS, _cfg(partition="dirichlet", num_sites=10, alpha=100.0)))
    iid = _label_skew(partition(LABELS, _cfg(partition="iid", num_sites=10)))
    assert skewed > mild > 0 and skewed > 3 * iid


def test_pathological_gives_k_classes_per_site():
    sites = partition(LABELS, _cfg(partition="pathological", num_sites=10, classes_per_site=2))
    counts = np.array(class_counts(LABELS, sites, 10))
    assert ((counts > 0).sum(1) == 2).all()
    assert (counts.sum(0) == 100).all()


def test_quantity_skew_varies_sizes_not_labels():
    sites = partition(LABELS, _cfg(partition="quantity", num_sites=10, alpha=0.3))
    sizes = [len(s) for s in sites]
    assert max(sizes) > 3 * min(sizes)


def test_too_many_sites_is_a_clear_error():
    with pytest.raises(ConfigError, match="at least"):
        partition(np.arange(10) % 2, _cfg(num_sites=6, min_sites=2))
    with pytest.raises(ConfigError, match="classes-per-site"):
        partition(LABELS, _cfg(partition="pathological", classes_per_site=11))
