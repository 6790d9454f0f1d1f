"""DP-SGD inside Task.train: both per-sample methods, Poisson steps, noise, bad input."""

from __future__ import annotations

import pytest
import torch

from fedlens.shared.config import FedConfig
from fedlens.shared.errors import ConfigError, DataError
from fedlens.shared.models import train_mode
from fedlens.shared.privacy import DPSGD, resolve_dp_mode
from fedlens.shared.privacy.dpsgd import sample_rate_for, steps_per_epoch
from fedlens.shared.task import LocalData, Task


@pytest.fixture(scope="module")
def task() -> Task:
    # SGD: Adam's normalisation would turn float rounding in near-zero gradients into full steps.
    return Task(FedConfig(image_size=64, device="cpu", batch_size=16, optimizer="sgd", lr=0.05), num_classes=4)


def _features(task: Task, n: int = 96) -> LocalData:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 320, 2, 2, generator=g)  # what the frozen part hands the last-1 head at 64 px
    return LocalData(x, torch.randint(0, 4, (n,), generator=g), task.cut, 4)


def _train(task: Task, data: LocalData, dp: DPSGD | None, seed: int = 3, dp_seed: int | None = 11) -> dict[str, torch.Tensor]:
    start = task.trainable_state()
    torch.manual_seed(seed)  # dropout masks
    try:
        stats = task.train(data, epochs=1, seed=seed, dp=dp, dp_seed=dp_seed)
        assert stats.num_examples == len(data)
        return {k: v - start[k] for k, v in task.trainable_state().items()}
    finally:
        task.load_trainable(start)


def _dp(mode: str, noise: float = 0.0, clip: float = 1e6) -> DPSGD:
    return DPSGD(noise_multiplier=noise, max_grad_norm=clip, sample_rate=16 / 96, expected_batch_size=16, mode=mode, secure_rng=False)


def test_book_keeping_and_opacus_hooks_train_identically(task):
    data = _features(task)
    fast, hooks = _train(task, data, _dp("book-keeping", clip=0.5)), _train(task, data, _dp("hooks", clip=0.5))
    for name in fast:
        torch.testing.assert_close(fast[name], hooks[name], rtol=1e-3, atol=1e-6)


def test_noise_is_added_from_fresh_entropy_unless_seeded(task):
    data = _features(task)
    quiet, noisy = _train(task, data, _dp("auto")), _train(task, data, _dp("auto", noise=1.0, clip=1.0))
    again = _train(task, data, _dp("auto", noise=1.0, clip=1.0))
    name = next(iter(quiet))
    assert not torch.allclose(quiet[name], noisy[name])
    torch.testing.assert_close(noisy[name], again[name])  # an explicit dp_seed repeats the noise
    fresh = [_train(task, data, _dp("auto", noise=1.0, clip=1.0), dp_seed=None) for _ in range(2)]
    assert not torch.allclose(fresh[0][name], fresh[1][name])  # by default nobody can predict it


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
            DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, expected_batch_size=8, secure_rng=True).generators(
                0, torch.device("cpu")
            )
    else:
        pytest.skip("torchcsprng is installed here")


def test_opacus_hooks_on_a_depthwise_policy_match_per_example_autograd(task):
    """Channels-last CPU tensors must not corrupt Opacus' conv per-sample gradients."""

    t = Task(FedConfig(image_size=64, device="cpu", policy="last-2"), num_classes=3)
    head = t.head
    train_mode(head, True)  # Opacus records activations in training mode only
    for m in head.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()  # no dropout: compare exact gradients
    x = torch.randn(4, *t.model.forward_until(torch.zeros(1, 3, 64, 64), t.cut).shape[1:]).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (4,))
    params = [p for p in head.parameters() if p.requires_grad]
    brute = []
    for i in range(4):
        loss = torch.nn.functional.cross_entropy(head(x[i : i + 1]), y[i : i + 1], reduction="sum")
        brute.append(torch.autograd.grad(loss, params))
    dp = DPSGD(noise_multiplier=0.0, max_grad_norm=1e9, sample_rate=0.5, expected_batch_size=2, mode="hooks", secure_rng=False)
    stepper = dp.stepper(head, torch.optim.SGD(params, lr=0.0), torch.Generator().manual_seed(0))
    try:
        loss = torch.nn.functional.cross_entropy(head(x.contiguous()), y, reduction="none")
        loss.sum().backward()
        for j, p in enumerate(params):
            expected = torch.stack([b[j] for b in brute])
            torch.testing.assert_close(p.grad_sample, expected, rtol=1e-4, atol=1e-5)
    finally:
        stepper.close()


def test_an_empty_poisson_batch_is_a_noise_only_step(task):
    tiny = _features(task, n=20)
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.01, expected_batch_size=1, mode="hooks", secure_rng=False)
    stats = task.train(tiny, epochs=1, seed=0, dp=dp, dp_seed=5)  # q = 0.01 over 20 images: mostly empty batches
    assert stats.steps == 100
