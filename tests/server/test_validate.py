"""The update validator: one test per rule, and the DP-derived norm bound against real DP-SGD."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedlens.server.validate import UpdateRefused, UpdateValidator, norm_bound_rule
from fedlens.shared.config import FedConfig
from fedlens.shared.privacy import DPSGD
from fedlens.shared.privacy.dpsgd import update_norm_bound
from fedlens.shared.protocol import NUM_EXAMPLES, UNIT_WEIGHT

GLOBAL = {"w": torch.zeros(4, 3), "b": torch.zeros(4)}
DP_METRICS = {"dp": 1.0, "noise-multiplier": 1.0, "epsilon": 0.5, "delta": 1e-5, "sample-rate": 0.1, "dp-steps": 10.0}


def _validator(**cfg: object) -> UpdateValidator:
    validator = UpdateValidator(FedConfig.from_mapping({"dp": False, **cfg}))
    validator.expect(ArrayRecord({k: v.clone() for k, v in GLOBAL.items()}))
    return validator


def _content(arrays: dict[str, object] | None = None, count: object = 100, **metrics: object) -> RecordDict:
    state = {k: v + 0.01 for k, v in GLOBAL.items()} if arrays is None else arrays
    record = ArrayRecord({k: v if isinstance(v, Array) else Array(np.asarray(v)) for k, v in state.items()})
    values = {NUM_EXAMPLES: count, **metrics} if count is not None else dict(metrics)
    return RecordDict({"arrays": record, "metrics": MetricRecord(values)})


def assert_refused(validator: UpdateValidator, content: RecordDict, fragment: str, site: str = "site-x") -> None:
    with pytest.raises(UpdateRefused, match=fragment):
        validator.train_reply(site, content)


def test_an_honest_reply_passes_and_is_reweighted_by_its_validated_count():
    clean = _validator().train_reply("site-0", _content(count=100, accuracy=0.5))
    assert dict(clean.metric_records["metrics"]) == {NUM_EXAMPLES: 100.0, "accuracy": 0.5}
    assert set(clean.array_records["arrays"].keys()) == {"w", "b"}


def test_one_array_record_and_one_metric_record():
    content = _content()
    content["more"] = ArrayRecord({"w": torch.zeros(4, 3)})
    assert_refused(_validator(), content, "exactly one ArrayRecord")
    assert_refused(_validator(), RecordDict({"arrays": _content().array_records["arrays"]}), "exactly one MetricRecord")


def test_the_arrays_are_exactly_the_models_names():
    assert_refused(_validator(), _content({"w": torch.zeros(4, 3)}), "missing \\['b'\\]")
    assert_refused(_validator(), _content({**GLOBAL, "extra": torch.zeros(1)}), "unexpected \\['extra'\\]")


@pytest.mark.parametrize(
    "array, fragment",
    [
        (torch.zeros(5, 3), r"float32 \(5, 3\), the model's is float32 \(4, 3\)"),
        (torch.zeros(4, 3, dtype=torch.float64), "float64"),
        (torch.zeros(4, 3, dtype=torch.int32), "int32"),
        (torch.zeros(12), r"\(12,\)"),
    ],
    ids=["shape", "float64", "int32", "flattened"],
)
def test_shape_and_dtype_must_match_the_model(array, fragment):
    assert_refused(_validator(), _content({**GLOBAL, "w": array}), fragment)


def test_every_value_must_be_finite():
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = torch.zeros(4, 3)
        w[1, 2] = bad
        assert_refused(_validator(), _content({**GLOBAL, "w": w}), "1 non-finite value")


def test_unreadable_arrays_are_refused_without_unpickling():
    good = Array(np.zeros((4, 3), dtype=np.float32))
    truncated = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[: len(good.data) // 2])
    assert_refused(_validator(), _content({**GLOBAL, "w": truncated}), "cannot be read")
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert_refused(
        _validator(),
        _content({**GLOBAL, "w": Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=pickled.getvalue())}),
        "cannot be read",
    )
    assert_refused(
        _validator(), _content({**GLOBAL, "w": Array(dtype="float32", shape=(4, 3), stype="torch", data=good.data)}), "not numpy"
    )
    oversize = Array(np.zeros((4000, 3), dtype=np.float32))
    assert_refused(
        _validator(), _content({**GLOBAL, "w": Array(dtype="float32", shape=(4, 3), stype=oversize.stype, data=oversize.data)}), "far more"
    )


@pytest.mark.parametrize(
    "count, fragment",
    [
        (None, "has no `num-examples`"),
        (0, "below 1"),
        (-5, "below 1"),
        (2.5, "whole number"),
        (float("nan"), "whole number"),
        ([100], "whole number"),
    ],
)
def test_the_count_must_be_a_positive_whole_number(count, fragment):
    assert_refused(_validator(), _content(count=count), fragment)


def test_the_count_is_capped_by_max_site_examples_and_by_the_first_claim():
    assert_refused(_validator(), _content(count=10**9), "more than max-site-examples \\(1000000\\)")
    validator = _validator(**{"max-site-examples": 500})
    assert_refused(validator, _content(count=501), "max-site-examples")
    validator.train_reply("site-a", _content(count=200))
    validator.train_reply("site-a", _content(count=150))  # fewer images (a smaller split) is fine
    assert_refused(validator, _content(count=300), "more than the 200 it claimed first", site="site-a")
    validator.train_reply("site-b", _content(count=300))  # another site's claim is its own


def test_a_dp_run_takes_only_dp_sgd_updates():
    validator = _validator(dp=True, **{"max-update-norm": 100.0})
    assert_refused(validator, _content(), "no DP-SGD accounting")
    assert_refused(validator, _content(**{**DP_METRICS, "noise-multiplier": float("nan")}), "no DP-SGD accounting")
    assert_refused(validator, _content(**{**DP_METRICS, "dp": 0.0}), "no DP-SGD accounting")
    assert_refused(validator, _content(**{k: v for k, v in DP_METRICS.items() if k != "delta"}), "no DP-SGD accounting")
    assert validator.train_reply("site-0", _content(**DP_METRICS))


def test_the_norm_rule_configured():
    validator = _validator(**{"max-update-norm": 1.0})
    validator.train_reply("site-0", _content({"w": torch.full((4, 3), 0.2), "b": torch.zeros(4)}))  # norm 0.69
    assert_refused(validator, _content({"w": torch.full((4, 3), 0.5), "b": torch.zeros(4)}), r"moves the model by 1.732")
    assert _validator().norm_bound(num_examples=100, noise_multiplier=None) is None  # no DP, nothing configured: no norm rule
    assert "set max-update-norm" in norm_bound_rule(FedConfig.from_mapping({"dp": False}))


def test_under_central_dp_the_sites_clipping_bounds_the_norm_and_every_weight_is_one():
    cfg = FedConfig.from_mapping({"dp": False, "central-dp": "client", "central-clip": 0.5})
    validator = UpdateValidator(cfg, weight_key=UNIT_WEIGHT)
    validator.expect(ArrayRecord({k: v.clone() for k, v in GLOBAL.items()}))
    clean = validator.train_reply("site-0", _content({"w": torch.full((4, 3), 0.1), "b": torch.zeros(4)}, **{UNIT_WEIGHT: 1e9}))
    assert clean.metric_records["metrics"][UNIT_WEIGHT] == 1.0
    assert_refused(validator, _content({"w": torch.full((4, 3), 0.2), "b": torch.zeros(4)}), "bound 0.5")


def test_the_derived_bound_follows_its_formula():
    bound = update_norm_bound(
        lr=0.5, momentum=0.9, max_grad_norm=1.0, noise_multiplier=1.2, batch_size=32, num_examples=320, epochs=2, num_params=100
    )
    steps = 2 * 10
    expected = 0.5 / 0.1 / 32 * (steps * 32 + 8 * math.sqrt(steps * 32) + 64 + 1.2 * math.sqrt(steps) * (10 + 8))
    assert bound == pytest.approx(expected)
    validator = _validator(dp=True, lr=0.5, momentum=0.9, **{"batch-size": 32})
    assert validator.norm_bound(num_examples=320, noise_multiplier=1.2) == pytest.approx(
        update_norm_bound(
            lr=0.5, momentum=0.9, max_grad_norm=1.0, noise_multiplier=1.2, batch_size=32, num_examples=320, epochs=1, num_params=16
        )
    )
    assert _validator(dp=True, optimizer="adam").norm_bound(num_examples=320, noise_multiplier=1.0) is None  # not covered: say so


def test_real_dp_sgd_stays_within_the_derived_bound_and_a_scaled_update_does_not():
    torch.manual_seed(0)
    model = torch.nn.Linear(20, 5)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n, batch, lr, momentum, sigma = 400, 40, 2.0, 0.9, 0.8
    x, y = torch.randn(n, 20) * 5, torch.randint(0, 5, (n,))
    dp = DPSGD(noise_multiplier=sigma, max_grad_norm=1.0, sample_rate=batch / n, expected_batch_size=batch, secure_rng=False, mode="hooks")
    sampling, noise = dp.generators(1, torch.device("cpu"))
    stepper = dp.stepper(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum), noise)
    for idx in dp.batches(n, epochs=2, generator=sampling):
        if len(idx) == 0:
            stepper.noise_only()
            continue
        stepper.step(torch.nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="none"))
    stepper.close()
    trained = {k: v.detach() for k, v in model.state_dict().items()}
    distance = math.sqrt(sum(float(((trained[k] - start[k]) ** 2).sum()) for k in start))
    bound = update_norm_bound(
        lr=lr, momentum=momentum, max_grad_norm=1.0, noise_multiplier=sigma, batch_size=batch, num_examples=n, epochs=2, num_params=105
    )
    assert 0 < distance < bound
    validator = UpdateValidator(FedConfig.from_mapping({"lr": lr, "momentum": momentum, "batch-size": batch, "local-epochs": 2}))
    validator.expect(ArrayRecord(start))
    metrics = {**DP_METRICS, "noise-multiplier": sigma}
    validator.train_reply("site-0", _content(trained, count=n, **metrics))
    scaled = {k: start[k] + (bound / distance) * 1.01 * (trained[k] - start[k]) for k in start}
    assert_refused(validator, _content(scaled, count=n, **metrics), "more than the bound")


def test_evaluation_replies_allow_no_images_but_not_garbage():
    validator = _validator()
    clean = validator.evaluate_reply(RecordDict({"metrics": MetricRecord({NUM_EXAMPLES: 0, "accuracy": 0.0, "loss": float("nan")})}))
    assert dict(clean.metric_records["metrics"]) == {NUM_EXAMPLES: 0.0, "accuracy": 0.0}  # the NaN loss is dropped
    with pytest.raises(UpdateRefused, match="exactly one MetricRecord"):
        validator.evaluate_reply(RecordDict({"config": ConfigRecord({"accuracy": 1.0})}))
    with pytest.raises(UpdateRefused, match="evaluation images"):
        validator.evaluate_reply(RecordDict({"metrics": MetricRecord({NUM_EXAMPLES: 10**9})}))


def test_a_secure_aggregate_is_checked_as_a_whole():
    validator = _validator(**{"max-update-norm": 1.0})
    validator.check_aggregate(ArrayRecord({"w": torch.full((4, 3), 0.1), "b": torch.zeros(4)}), counts=[10, 20], noises=[None, None])
    with pytest.raises(UpdateRefused, match="securely aggregated update"):
        validator.check_aggregate(ArrayRecord({"w": torch.full((4, 3), 1.0), "b": torch.zeros(4)}), counts=[10, 20], noises=[None, None])
    w = torch.zeros(4, 3)
    w[0, 0] = float("nan")
    with pytest.raises(UpdateRefused, match="non-finite"):
        validator.check_aggregate(ArrayRecord({"w": w, "b": torch.zeros(4)}), counts=[10], noises=[None])


def test_the_accounting_a_dp_run_requires_is_what_a_private_site_sends():
    from fedlens.shared.privacy import LedgerEntry
    from fedlens.shared.privacy.site import privacy_metrics
    from fedlens.shared.protocol import PRIVACY_METRICS

    entry = LedgerEntry(
        run_id="r", round=1, noise_multiplier=1.0, sample_rate=0.1, steps=10, epsilon=0.5, delta=1e-5, accountant="rdp", time=0.0
    )
    assert set(privacy_metrics(entry, run_steps=10)) == set(PRIVACY_METRICS)
