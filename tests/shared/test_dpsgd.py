"""DP-SGD inside Task.train: both per-sample methods, Poisson steps, noise, bad input."""

from __future__ import annotations

import pytest
import torch

from shared.config import FedConfig
from shared.errors import ConfigError, DataError
from shared.privacy import DPSGD, resolve_dp_mode
from shared.privacy.dpsgd import sample_rate_for, steps_per_epoch
from shared.task import LocalData, Task


@pytest.fixture(scope="module")
def task() -> Task:
    # SGD: Adam's normalisation would turn float rounding in near-zero gradients into full steps.
    return Task(FedConfig(image_size=64, device="cpu", batch_size=16, optimizer="sgd", lr=0.05), num_classes=4)


def _features(task: Task, n: int = 96) -> LocalData:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 320, 2, 2, generator=g)  # what the frozen part hands the last-1 head at 64 px
    return LocalData(x, torch.randint(0, 4, (n,), generator=g), task.cut, 4)


def _train(task: Task, data: LocalData, dp: DPSGD | None, seed: int = 3) -> dict[str, torch.Tensor]:
    start = task.trainable_state()
    torch.manual_seed(seed)  # dropout masks
    try:
        stats = task.train(data, epochs=1, seed=seed, dp=dp)
        assert stats.num_examples == len(data)
        return {k: v - start[k] for k, v in task.trainable_state().items()}
    finally:
        task.load_trainable(start)


def _dp(mode: str, noise: float = 0.0, clip: float = 1e6) -> DPSGD:
    return DPSGD(noise_multiplier=noise, max_grad_norm=clip, sample_rate=16 / 96, expected_batch_size=16, mode=mode)


def test_book_keeping_and_opacus_hooks_train_identically(task):
    data = _features(task)
    fast, hooks = _train(task, data, _dp("book-keeping", clip=0.5)), _train(task, data, _dp("hooks", clip=0.5))
    for name in fast:
        torch.testing.assert_close(fast[name], hooks[name], rtol=1e-3, atol=1e-6)


def test_noise_is_added_and_seeded(task):
    data = _features(task)
    quiet, noisy = _train(task, data, _dp("auto")), _train(task, data, _dp("auto", noise=1.0, clip=1.0))
    again = _train(task, data, _dp("auto", noise=1.0, clip=1.0))
    other_seed = _train(task, data, _dp("auto", noise=1.0, clip=1.0), seed=4)
    name = next(iter(quiet))
    assert not torch.allclose(quiet[name], noisy[name])
    torch.testing.assert_close(noisy[name], again[name])  # insecure mode is reproducible
    assert not torch.allclose(noisy[name], other_seed[name])


def test_poisson_steps_follow_the_sample_rate(task):
    data = _features(task)
    dp = _dp("auto")
    stats = task.train(data, epochs=2, seed=0, dp=dp)
    assert stats.steps == 2 * steps_per_epoch(dp.sample_rate) == 12


def test_fastest_exact_mode_is_chosen_per_policy():
    lite_last1 = Task(FedConfig(image_size=32, device="cpu"), 3)
    assert resolve_dp_mode(lite_last1.head, "auto") == "book-keeping"
    lite_last2 = Task(FedConfig(image_size=32, device="cpu", policy="last-2"), 3)
    assert resolve_dp_mode(lite_last2.head, "auto") == "hooks"  # depthwise conv
    with pytest.raises(ConfigError, match="book-keeping"):
        resolve_dp_mode(lite_last2.head, "book-keeping")


def test_site_no_larger_than_a_batch_is_refused_with_advice():
    with pytest.raises(DataError, match="lower `batch-size`"):
        sample_rate_for(64, 40)
    assert sample_rate_for(64, 6400) == 0.01


def test_secure_rng_without_torchcsprng_says_how_to_fix():
    pytest.importorskip("torch")
    try:
        import torchcsprng  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="torchcsprng"):
            DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, expected_batch_size=8, secure_rng=True).generators(0, torch.device("cpu"))
    else:
        pytest.skip("torchcsprng is installed here")
