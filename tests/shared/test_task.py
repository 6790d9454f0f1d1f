import math
from pathlib import Path

import pytest
import torch

from fedlens.shared.config import FedConfig
from fedlens.shared.data import load_image_folder
from fedlens.shared.errors import TrainingDiverged
from fedlens.shared.models import get_backbone
from fedlens.shared.privacy import DPSGD
from fedlens.shared.task import Task, local_steps


def _task(cache_dir, **kw):
    values = {"image-size": 32, "policy": "last-1", "cache-dir": cache_dir, "batch-size": 8, **kw}
    return Task(FedConfig.from_mapping(values), num_classes=3)


def test_cached_features_give_the_same_predictions_as_raw_images(image_folder, cache_dir):
    images, _ = load_image_folder(image_folder, image_size=32)
    task = _task(cache_dir)
    cached = task.prepare(images, for_training=True)
    raw = _task(cache_dir, **{"feature-cache": False}).prepare(images, for_training=True)
    assert cached.start == task.cut and raw.start == 0
    assert torch.allclose(task.predict(cached), task.predict(raw), atol=1e-4)
    # A second prepare reads the cache file instead of recomputing.
    assert list((Path(cache_dir) / "features").glob("*.pt"))
    assert torch.equal(task.prepare(images, for_training=True).inputs, cached.inputs)


def test_the_full_policy_trains_and_evaluates_on_raw_images(image_folder, cache_dir):
    # policy full: the trainable part starts at stage 0, so the data are the raw uint8 images.
    images, _ = load_image_folder(image_folder, image_size=32)
    task = _task(cache_dir, policy="full", lr=0.003)
    data = task.prepare(images, for_training=True)
    assert task.cut == 0 and data.start == 0 and data.inputs.dtype == torch.uint8
    stats = task.train(data, epochs=1, seed=0)
    assert stats.steps > 0 and math.isfinite(stats.loss)
    assert task.evaluate(task.prepare(images, for_training=False)).accuracy >= 0.0


def test_augmentation_disables_the_cache_for_training_only(image_folder, cache_dir):
    images, _ = load_image_folder(image_folder, image_size=32)
    task = _task(cache_dir, augment="flip,color")
    assert task.prepare(images, for_training=True).start == 0
    assert task.prepare(images, for_training=False).start == task.cut


def test_local_training_learns_a_separable_task(image_folder, cache_dir):
    images, _ = load_image_folder(image_folder, image_size=32)
    task = _task(cache_dir, lr=0.003)
    data = task.prepare(images, for_training=True)
    before = task.evaluate(data).loss
    stats = task.train(data, epochs=15, seed=0)
    after = task.evaluate(data)
    assert stats.num_examples == 36 and stats.steps == 15 * 5
    assert after.loss < before
    assert after.accuracy > 0.6  # chance is 1/3


@pytest.mark.parametrize(
    "num_examples, epochs, min_steps, expected",
    [
        pytest.param(800, 1, 0, 13, id="one-epoch-of-800"),  # 12 full batches of 64 and a short one
        pytest.param(800, 1, 32, 32, id="small-site-floor"),
        pytest.param(264, 1, 32, 32, id="tiny-site-floor"),
        pytest.param(2183, 1, 32, 35, id="large-site-untouched"),
        pytest.param(800, 3, 32, 39, id="epochs-above-the-floor"),
        pytest.param(64, 1, 0, 1, id="one-batch"),
    ],
)
def test_local_steps_are_epochs_with_a_floor(num_examples, epochs, min_steps, expected):
    assert local_steps(num_examples, batch_size=64, epochs=epochs, min_steps=min_steps) == expected


def test_a_small_site_takes_at_least_min_steps(image_folder, cache_dir):
    images, _ = load_image_folder(image_folder, image_size=32)
    task = _task(cache_dir, lr=0.003)
    data = task.prepare(images, for_training=True)  # 36 images, batch 8: 5 steps per pass
    assert task.train(data, epochs=1, seed=0).steps == 5
    assert task.train(data, epochs=1, seed=0, min_steps=12).steps == 12  # two more passes, the last cut short
    assert task.train(data, epochs=3, seed=0, min_steps=12).steps == 15  # epochs above the floor decide


def test_min_steps_is_refused_under_dp_sgd(image_folder, cache_dir):
    images, _ = load_image_folder(image_folder, image_size=32)
    task = _task(cache_dir)
    data = task.prepare(images, for_training=True)
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=8 / 36, expected_batch_size=8, secure_rng=False)
    start = task.trainable_state()
    with pytest.raises(ValueError, match="non-private training only"):
        task.train(data, epochs=1, seed=0, min_steps=12, dp=dp)
    assert all(torch.equal(start[k], v) for k, v in task.trainable_state().items())  # nothing trained


def test_trainable_state_is_a_copy(cache_dir):
    task = _task(cache_dir)
    state = task.trainable_state()
    with torch.no_grad():
        for p in task.head.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert all(not torch.equal(state[k], v) for k, v in task.trainable_state().items())


def test_proximal_step_keeps_weights_closer_to_the_start(image_folder, cache_dir):
    images, _ = load_image_folder(image_folder, image_size=32)
    distances = []
    for mu in (0.0, 50.0):
        task = _task(cache_dir, lr=0.003)
        start = task.trainable_state()
        task.train(task.prepare(images, for_training=True), epochs=3, seed=0, proximal_mu=mu)
        end = task.trainable_state()
        distances.append(sum(float((end[k] - start[k]).norm()) for k in start))
    assert distances[1] < distances[0]


def test_dropout_before_the_classifier_comes_from_the_config(cache_dir):
    dropouts = [m for m in _task(cache_dir, dropout=0.0).head.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)
    assert all(m.p == 0.35 for m in _task(cache_dir, dropout=0.35).head.modules() if isinstance(m, torch.nn.Dropout))


def test_needs_feature_pass_until_the_cache_holds_the_images(image_folder, cache_dir):
    images, _ = load_image_folder(image_folder, image_size=32)
    task = _task(cache_dir)
    assert task.needs_feature_pass(images, for_training=True)
    task.prepare(images, for_training=True)
    assert not task.needs_feature_pass(images, for_training=True)
    assert not _task(cache_dir, augment="flip").needs_feature_pass(images, for_training=True)  # raw images, no pass


def test_the_task_preprocesses_with_its_backbones_transform(cache_dir):
    task = _task(cache_dir, backbone="efficientnet-lite0")
    assert task.transform.key == get_backbone("efficientnet-lite0").transforms(image_size=32).key


def test_a_changed_preprocessing_never_reuses_cached_features(image_folder, cache_dir):
    images, _ = load_image_folder(image_folder, image_size=32)
    small = _task(cache_dir)
    small.prepare(images, for_training=False)
    larger = _task(cache_dir, **{"image-size": 48})  # same weights and images, another resize
    assert larger.needs_feature_pass(images, for_training=False)
    feats = larger.prepare(images, for_training=False)
    assert not torch.equal(feats.inputs, small.prepare(images, for_training=False).inputs)  # shapes or values differ
    assert len(list((Path(cache_dir) / "features").glob("*.pt"))) == 2


def test_an_exploding_loss_stops_non_private_training_with_the_likely_cause(image_folder, cache_dir):
    images, _ = load_image_folder(image_folder, image_size=32)
    task = _task(cache_dir, lr=1e4, dp=False, optimizer="sgd")
    with pytest.raises(TrainingDiverged, match=r"batch loss .* past 10 x the first batch's") as err:
        task.train(task.prepare(images, for_training=True), epochs=5, seed=0)
    assert "`lr` = 10000 with sgd" in str(err.value) and 0 < err.value.steps < 25


def test_under_dp_only_the_weights_can_stop_training(image_folder, cache_dir):
    images, _ = load_image_folder(image_folder, image_size=32)
    # Noise of std 1e38 per coordinate: the first step takes the weights past float32's range.
    dp = DPSGD(noise_multiplier=1e37, max_grad_norm=10.0, sample_rate=8 / 36, expected_batch_size=8, secure_rng=False)
    task = _task(cache_dir, lr=100.0)
    with pytest.raises(TrainingDiverged, match="weights turned non-finite at step 1") as err:
        task.train(task.prepare(images, for_training=True), epochs=2, seed=0, dp=dp, dp_seed=1)
    assert err.value.steps == 1 and "loss" not in str(err.value)  # the private losses never leave
    assert "max-grad-norm" in str(err.value)


def test_divergence_factor_zero_lets_training_run_on(image_folder, cache_dir):
    images, _ = load_image_folder(image_folder, image_size=32)
    task = _task(cache_dir, lr=1e4, dp=False, optimizer="sgd", **{"divergence-factor": 0.0})
    stats = task.train(task.prepare(images, for_training=True), epochs=1, seed=0)
    assert stats.steps == 5
