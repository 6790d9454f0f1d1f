"""Fuzzing the server's message handling: garbage replies never crash it, never reach the
model, never corrupt the run folder, and each one is reported under its site's name.

Replies are real Flower Messages (records, arrays, metadata) as the ServerApp receives
them; the grid that delivers them is the only stand-in (no network).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from fedlens.server.guard import SiteGuard
from fedlens.server.strategies import build_strategy
from fedlens.server.validate import UpdateValidator
from fedlens.shared.checkpoint import load_checkpoint
from fedlens.shared.config import FedConfig
from fedlens.shared.protocol import NUM_EXAMPLES, SITE_RECORD

GLOBAL = {"conv.weight": torch.zeros(8, 4, 1, 1), "fc.weight": torch.zeros(3, 8), "fc.bias": torch.zeros(3)}


def _reply(node: int, content: RecordDict | None = None, *, error: str | None = None, kind: str = "train") -> Message:
    md = Metadata(
        run_id=1,
        message_id=f"r{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type=kind,
    )
    if error is not None:
        return Message(error=Error(code=0, reason=error), metadata=md)
    return Message(content=content, metadata=md)


def _honest(name: str, shift: float = 0.01, count: int = 50, arrays: dict[str, torch.Tensor] | None = None) -> RecordDict:
    state = {k: v + shift for k, v in (arrays or GLOBAL).items()}
    return RecordDict(
        {
            "arrays": ArrayRecord(state),
            "metrics": MetricRecord({NUM_EXAMPLES: count, "dp": 0.0, "train-loss": 0.4}),
            SITE_RECORD: ConfigRecord({"name": name}),
        }
    )


def _with_array(content: RecordDict, name: str, array: Array) -> RecordDict:
    content.array_records["arrays"][name] = array
    return content


def _npy(value: np.ndarray) -> Array:
    return Array(value)


# Each case: what a broken or hostile site might send instead of an update.
CASES: dict[str, Callable[[str], RecordDict]] = {
    "garbage-bytes": lambda n: _with_array(
        _honest(n), "fc.bias", Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=b"\x00garbage" * 3)
    ),
    "truncated": lambda n: _with_array(
        _honest(n),
        "fc.weight",
        Array(dtype="float32", shape=(3, 8), stype="numpy.ndarray", data=_npy(np.zeros((3, 8), np.float32)).data[:40]),
    ),
    "missing-array": lambda n: RecordDict(
        {
            "arrays": ArrayRecord({"fc.bias": torch.zeros(3)}),
            "metrics": MetricRecord({NUM_EXAMPLES: 5}),
            SITE_RECORD: ConfigRecord({"name": n}),
        }
    ),
    "extra-array": lambda n: _with_array(_honest(n), "backdoor", _npy(np.zeros(3, np.float32))),
    "float64": lambda n: _with_array(_honest(n), "fc.bias", _npy(np.zeros(3, np.float64))),
    "int-array": lambda n: _with_array(_honest(n), "fc.bias", _npy(np.zeros(3, np.int64))),
    "oversize": lambda n: _with_array(_honest(n), "fc.weight", _npy(np.zeros((3000, 8), np.float32))),
    "lying-header": lambda n: _with_array(
        _honest(n), "fc.bias", Array(dtype="float32", shape=(3,), stype="numpy.ndarray", data=_npy(np.zeros(7, np.float32)).data)
    ),
    "not-numpy": lambda n: _with_array(_honest(n), "fc.bias", Array(dtype="float32", shape=(3,), stype="safetensors", data=b"1234")),
    "nan": lambda n: _honest(n, shift=float("nan")),
    "inf": lambda n: _honest(n, shift=float("inf")),
    "no-arrays": lambda n: RecordDict({"metrics": MetricRecord({NUM_EXAMPLES: 5}), SITE_RECORD: ConfigRecord({"name": n})}),
    "two-array-records": lambda n: RecordDict({**_honest(n), "more": ArrayRecord(GLOBAL)}),
    "no-metrics": lambda n: RecordDict({"arrays": ArrayRecord(GLOBAL), SITE_RECORD: ConfigRecord({"name": n})}),
    "metrics-as-config": lambda n: RecordDict(
        {"arrays": ArrayRecord(GLOBAL), "metrics": ConfigRecord({NUM_EXAMPLES: "50"}), SITE_RECORD: ConfigRecord({"name": n})}
    ),
    "no-count": lambda n: RecordDict(
        {"arrays": ArrayRecord(GLOBAL), "metrics": MetricRecord({"train-loss": 1.0}), SITE_RECORD: ConfigRecord({"name": n})}
    ),
    "negative-count": lambda n: _honest(n, count=-3),
    "huge-count": lambda n: _honest(n, count=10**9),
    "list-count": lambda n: RecordDict(
        {"arrays": ArrayRecord(GLOBAL), "metrics": MetricRecord({NUM_EXAMPLES: [1, 2]}), SITE_RECORD: ConfigRecord({"name": n})}
    ),
    "empty": lambda n: RecordDict({SITE_RECORD: ConfigRecord({"name": n})}),
}


def _guard(**cfg: object) -> SiteGuard:
    config = FedConfig.from_mapping({"dp": False, "num-sites": 50, "max-update-norm": 1.0, **cfg})
    validator = UpdateValidator(config)
    guard = SiteGuard(build_strategy(config), validator=validator)
    validator.expect(ArrayRecord(GLOBAL))
    return guard


def test_every_hostile_reply_is_refused_by_name_and_the_honest_ones_are_averaged():
    guard = _guard()
    replies = [_reply(1, _honest("honest-a", shift=0.01, count=10)), _reply(2, _honest("honest-b", shift=0.04, count=30))]
    for i, (case, make) in enumerate(CASES.items()):
        replies.append(_reply(100 + i, make(f"site-{case}")))
    replies.append(_reply(99, error="Traceback ...\n" + "x" * 100_000 + "\nRuntimeError: crashed"))
    guard._sent = [m.metadata.src_node_id for m in replies]
    arrays, _metrics = guard.aggregate_train(1, replies)
    assert arrays is not None
    # Only the two honest updates count, weighted 10:30 by their validated counts.
    assert np.allclose(arrays["fc.bias"].numpy(), 0.25 * 0.01 + 0.75 * 0.04)
    failures = guard.round_failures()
    for case in CASES:
        assert "refused" in failures[f"site-{case}"], case
    assert set(guard.current.train) == {"honest-a", "honest-b"}
    assert failures["node-99"].endswith("RuntimeError: crashed")


def test_metrics_only_some_sites_report_do_not_cost_the_round():
    guard = _guard()
    odd = _honest("odd")
    odd.metric_records["metrics"]["surprise"] = 3.0
    replies = [_reply(1, _honest("a")), _reply(2, odd)]
    guard._sent = [1, 2]
    arrays, metrics = guard.aggregate_train(1, replies)  # Flower alone refuses replies whose metric keys differ
    assert arrays is not None and "surprise" not in (metrics or {})
    assert guard.current.train["odd"]["surprise"] == 3.0  # still recorded for the site itself


def test_self_reported_names_are_made_safe():
    guard = _guard()
    weird = _honest("../../etc/passwd\n<script>" + "x" * 500)
    unnamed = _honest("ignored")
    unnamed.config_records[SITE_RECORD] = ConfigRecord({"nom": "x"})
    guard._sent = [1, 2]
    guard.aggregate_train(1, [_reply(1, weird), _reply(2, unnamed)])
    names = set(guard.current.train)
    assert "node-2" in names
    (name,) = names - {"node-2"}
    assert len(name) <= 64 and "/" not in name and "\n" not in name and "<" not in name


def test_garbage_evaluation_replies_are_refused_and_zero_images_everywhere_is_no_crash():
    guard = _guard()
    good = RecordDict({"metrics": MetricRecord({NUM_EXAMPLES: 20, "accuracy": 0.5}), SITE_RECORD: ConfigRecord({"name": "a"})})
    bad = RecordDict({"metrics": MetricRecord({"accuracy": 0.9}), SITE_RECORD: ConfigRecord({"name": "b"})})
    metrics = guard.aggregate_evaluate(1, [_reply(1, good, kind="evaluate"), _reply(2, bad, kind="evaluate")])
    assert metrics is not None and metrics["accuracy"] == pytest.approx(0.5)
    assert "refused" in guard.round_failures()["b"]
    empty = RecordDict({"metrics": MetricRecord({NUM_EXAMPLES: 0, "accuracy": 0.0}), SITE_RECORD: ConfigRecord({"name": "c"})})
    assert guard.aggregate_evaluate(2, [_reply(3, empty, kind="evaluate")]) is None


def _mutate(content: RecordDict, rng: random.Random) -> RecordDict:
    """One random corruption of an honest reply: bytes flipped, cut or grown, records dropped, values changed."""
    arrays = content.array_records["arrays"]
    name = rng.choice(list(arrays.keys()))
    array = arrays[name]
    data = bytearray(array.data)
    roll = rng.randrange(7)
    if roll == 0:
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif roll == 1:
        data = data[: rng.randrange(len(data))]
    elif roll == 2:
        data += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    elif roll == 3:
        del content.array_records["arrays"]
        return content
    elif roll == 4:
        content.metric_records["metrics"][NUM_EXAMPLES] = rng.choice([0, -1, 0.5, 1e12, float("inf"), float("nan")])
        return content
    elif roll == 5:
        arrays[name] = Array(
            dtype=array.dtype, shape=tuple(rng.randrange(1, 9) for _ in range(rng.randrange(0, 4))), stype=array.stype, data=bytes(data)
        )
        return content
    else:
        content.metric_records.clear()
        return content
    arrays[name] = Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=bytes(data))
    return content


def test_random_corruptions_never_crash_the_guard_nor_reach_the_average():
    rng = random.Random(16)
    for round_ in range(1, 41):
        guard = _guard()
        honest = [_reply(1, _honest("a", shift=0.02)), _reply(2, _honest("b", shift=0.02))]
        fuzzed = [_reply(10 + i, _mutate(_honest(f"f{i}"), rng)) for i in range(5)]
        guard._sent = [m.metadata.src_node_id for m in honest + fuzzed]
        arrays, _ = guard.aggregate_train(round_, honest + fuzzed)
        values = np.concatenate([a.numpy().ravel() for a in arrays.values()])
        accepted = set(guard.current.train) - {"a", "b"}
        # Whatever got through is a well-formed update: the average stays finite and within the honest range.
        assert np.isfinite(values).all()
        assert math.isclose(float(values.max()), 0.02, rel_tol=1e-5) or accepted, values.max()
        assert set(guard.round_failures()) | accepted == {f"f{i}" for i in range(5)}


class ScriptedGrid:
    """Delivers, for each node, the reply its script makes from the message it was sent."""

    def __init__(self, scripts: dict[int, Callable[[Message], Message]]) -> None:
        self.scripts = scripts

    def get_node_ids(self) -> list[int]:
        return list(self.scripts)

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        return [self.scripts[m.metadata.dst_node_id](m) for m in messages]


def _site(node: int, name: str, case: str | None) -> Callable[[Message], Message]:
    def answer(msg: Message) -> Message:
        if msg.metadata.message_type == "evaluate":
            metrics = {NUM_EXAMPLES: 10, "accuracy": 0.5, "loss": 1.0} if case is None else {"accuracy": float("nan")}
            return _reply(node, RecordDict({"metrics": MetricRecord(metrics), SITE_RECORD: ConfigRecord({"name": name})}), kind="evaluate")
        received = msg.content["arrays"].to_torch_state_dict()
        content = _honest(name, shift=0.001, arrays=received) if case is None else CASES[case](name)
        return _reply(node, content)

    return answer


def test_a_run_under_fire_finishes_with_an_intact_run_folder(tmp_path, cache_dir, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    from fedlens.server.app import serve
    from fedlens.shared.rundir import RunDir

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # what Flower sets in a ServerApp process
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 0)
    cases = ["nan", "huge-count", "truncated", "oversize", "no-metrics", "missing-array"]
    scripts = {1: _site(1, "honest-0", None), 2: _site(2, "honest-1", None)}
    scripts.update({10 + i: _site(10 + i, f"bad-{case}", case) for i, case in enumerate(cases)})
    cfg = FedConfig.from_mapping(
        {
            "dp": False,
            "num-sites": len(scripts),
            "num-rounds": 2,
            "image-size": 32,
            "max-train-images": 200,
            "max-test-images": 100,
            "max-update-norm": 50.0,
            "report-per-class": 0,
            "cache-dir": cache_dir,
        }
    )
    run = RunDir.create(tmp_path / "run", cfg)
    summary = serve(ScriptedGrid(scripts), cfg, run)  # type: ignore[arg-type]
    assert summary["rounds"] == 2 and json.loads((run.path / "status.json").read_text())["status"] == "finished"
    for case in cases:
        failures = summary["site_failures"][f"bad-{case}"]
        assert len(failures) == 2 and all("refused" in f for f in failures), (case, failures)
    records = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(set(r["sites_train"]) == {"honest-0", "honest-1"} for r in records)
    ckpt = load_checkpoint(run.path)
    assert ckpt.meta["round"] == 2 and all(torch.isfinite(v).all() for v in ckpt.state.values() if v.is_floating_point())
    json.loads((run.path / "summary.json").read_text())  # valid JSON
