"""SecAgg+ rounds on Flower's real simulation engine, with a tiny deterministic site update.

One simulation (3 sites, 3 rounds) feeds the end-to-end tests. In round 3 site 2 returns
a value SecAgg+ would clip; it must refuse, and the others' aggregate must still go through.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedlens.client.secagg import handle_secagg, is_secagg_message
from fedlens.server.secagg import run_secagg_rounds
from fedlens.shared.protocol import PARAM_NAMES_KEY, SITE_RECORD

NUM_SITES = 3
NUM_ROUNDS = 3
FAILING = (3, 2)  # (round, partition) where the site's update is out of SecAgg+'s range
REFUSED = (2, 0)  # (round, partition) whose plaintext the server refuses: its masked update is left out
CLIP = 8.0
LEVELS = 4194304  # quantization_range
MAX_WEIGHT = 1000.0  # not the server's cap: with 100-300 examples, weights 0.1-0.3 make round 3's 100.0 clip
OFFSET = 7  # an arbitrary "round-offset" the sites must see unchanged
INITIAL = {
    "layer.weight": torch.linspace(-1.0, 1.0, 12).reshape(4, 3),
    "layer.bias": torch.tensor([0.5, -0.25, 0.125]),
    "head": torch.arange(5, dtype=torch.float32) / 10,
}


def examples(pid: int) -> int:
    return 100 * (pid + 1)


def update(state: dict[str, torch.Tensor], pid: int, rnd: int) -> dict[str, torch.Tensor]:
    """What site ``pid`` sends back in round ``rnd``: a different shift per site and round."""
    return {name: v + 0.1 * (pid + 1) * rnd * torch.cos(torch.arange(v.numel()).reshape(v.shape) + pid) for name, v in state.items()}


def fedavg(state: dict[str, torch.Tensor], pids: Iterable[int], rnd: int) -> dict[str, np.ndarray]:
    """Plain weighted FedAvg of the sites' true updates (float64)."""
    pids = list(pids)
    total = sum(examples(p) for p in pids)
    updates = {p: update(state, p, rnd) for p in pids}
    return {n: sum(examples(p) / total * updates[p][n].double().numpy() for p in pids) for n in state}


def tolerance(pids: Iterable[int], largest: float) -> float:
    # Site i sends q_i = stochastic_round((w_i * x + c) * L / (2c)) with w_i = round(n_i / M * L) / L,
    # so each of its terms is off by less than one step 2c/L; the server divides the sum by
    # sum(w_i). The weights themselves are off by at most 1/(2L) each, moving the mean by at most
    # sum|dw_i| * 2 max|x| / sum(w_i). With c = 8, L = 2**22, weights 0.1..0.3: about 2.6e-5.
    pids = list(pids)
    total_weight = sum(examples(p) for p in pids) / MAX_WEIGHT
    n = len(pids)
    return (n * 2 * CLIP / LEVELS + n / (2 * LEVELS) * 2 * largest) / total_weight + 1e-6  # + float32 rounding


@dataclass
class Recorded:
    stages: list[tuple[int, str, list[Message]]] = field(default_factory=list)  # (round, stage, replies)
    evaluated: list[tuple[int, dict[str, torch.Tensor]]] = field(default_factory=list)
    rounds: list[tuple[int, dict[str, dict[str, float]], dict[int, str]]] = field(default_factory=list)
    final: dict[str, torch.Tensor] = field(default_factory=dict)


class RecordingGrid(Grid):
    """Pass everything to ``grid``; keep every reply the server receives."""

    def __init__(self, grid: Grid, log: Recorded) -> None:
        self.grid, self.log = grid, log

    def set_run(self, run):
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def push_messages(self, messages):
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.log.stages.append((int(messages[0].metadata.group_id), stage, replies))
        return replies


def build_apps(log: Recorded) -> tuple[ServerApp, ClientApp]:
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        assert is_secagg_message(msg)
        pid = int(context.node_config["partition-id"])

        def site_train(state: dict[str, torch.Tensor], config: dict[str, object]):
            rnd = int(config["server-round"])
            received = float(sum(v.double().sum() for v in state.values()))
            metrics = {"epsilon": 0.5 * rnd + pid, "server-round": rnd, "round-offset": config["round-offset"], "received-sum": received}
            new = update(state, pid, rnd)
            if (rnd, pid) == FAILING:  # 100 x weight 0.3 > clipping range 8
                new["head"][0] = 100.0
            return new, examples(pid), metrics, f"site-{pid}"

        return handle_secagg(msg, context, site_train)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        def evaluate_fn(rnd: int, arrays: ArrayRecord) -> MetricRecord:
            log.evaluated.append((rnd, arrays.to_torch_state_dict()))
            return MetricRecord({"round": rnd})

        final = run_secagg_rounds(
            RecordingGrid(grid, log),
            initial_arrays=ArrayRecord(dict(INITIAL)),
            num_rounds=NUM_ROUNDS,
            train_config={"round-offset": OFFSET, "lr": 0.1},
            evaluate_fn=evaluate_fn,
            on_round=lambda rnd, metrics, failures, _names: log.rounds.append((rnd, metrics, failures)),
            check_reply=lambda site, metrics: (
                "claims too much" if (site, metrics["server-round"]) == (f"site-{REFUSED[1]}", REFUSED[0]) else None
            ),
            clipping_range=CLIP,
            quantization_range=LEVELS,
            max_weight=MAX_WEIGHT,
            min_sites=NUM_SITES,  # the simulation registers its nodes while this starts: wait for all
        )
        log.final = final.to_torch_state_dict()

    return server, client


@pytest.fixture(scope="module")
def recorded() -> Recorded:
    log = Recorded()
    server, client = build_apps(log)
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=NUM_SITES,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    assert len(log.evaluated) == NUM_ROUNDS, "the simulation stopped early; see the Flower log above"
    return log


def aggregate(log: Recorded, rnd: int) -> dict[str, torch.Tensor]:
    return dict(log.evaluated[rnd - 1][1])


def masked_replies(log: Recorded, rnd: int) -> dict[int, Message]:
    """Round ``rnd``'s replies carrying masked vectors, by partition id."""
    (replies,) = [r for k, stage, r in log.stages if k == rnd and stage == Stage.COLLECT_MASKED_VECTORS]
    return {int(str(m.content.config_records[SITE_RECORD]["name"]).split("-")[1]): m for m in replies if not m.has_error()}


@pytest.mark.slow
def test_the_server_never_receives_a_site_update(recorded):
    replies = masked_replies(recorded, 1)
    assert sorted(replies) == list(range(NUM_SITES))
    state = {n: v.double() for n, v in INITIAL.items()}
    for pid, reply in replies.items():
        assert all(len(record) == 0 for record in reply.content.array_records.values())  # no plaintext arrays
        masked = [bytes_to_ndarray(b) for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        weight_levels = round(examples(pid) / MAX_WEIGHT * LEVELS)
        assert int(masked[0][0]) != weight_levels  # the weight is masked too
        true = update(state, pid, 1)
        for name, vector in zip(INITIAL, masked[1:], strict=True):
            quantised = (true[name].numpy() * weight_levels / LEVELS + CLIP) * LEVELS / (2 * CLIP)
            distance = np.abs(vector.astype(np.float64) - quantised)
            assert distance.min() > 100, name  # unmasked entries would be within one level
            decoded = (vector * 2 * CLIP / LEVELS - CLIP) / (weight_levels / LEVELS)
            assert np.abs(decoded - true[name].numpy()).min() > 1.0, name


@pytest.mark.slow
def test_the_aggregate_is_weighted_fedavg_within_quantisation_error(recorded):
    previous = {n: v.double() for n, v in INITIAL.items()}
    for rnd in range(1, NUM_ROUNDS + 1):
        pids = [p for p in range(NUM_SITES) if (rnd, p) not in (FAILING, REFUSED)]
        expected = fedavg(previous, pids, rnd)
        got = aggregate(recorded, rnd)
        assert list(got) == list(INITIAL) and all(v.dtype == torch.float32 for v in got.values())
        largest = max(float(np.abs(update(previous, p, rnd)[n].numpy()).max()) for p in pids for n in INITIAL)
        for name in INITIAL:
            error = np.abs(got[name].double().numpy() - expected[name]).max()
            assert error < tolerance(pids, largest), (rnd, name, error)
        previous = {n: v.double() for n, v in got.items()}
    for name in INITIAL:
        assert torch.equal(recorded.final[name], aggregate(recorded, NUM_ROUNDS)[name])


@pytest.mark.slow
def test_each_round_continues_from_the_aggregate_and_reports_every_site(recorded):
    assert [rnd for rnd, _ in recorded.evaluated] == list(range(1, NUM_ROUNDS + 1))
    assert [rnd for rnd, _, _ in recorded.rounds] == list(range(1, NUM_ROUNDS + 1))
    for rnd, metrics, failures in recorded.rounds:
        pids = [p for p in range(NUM_SITES) if (rnd, p) not in (FAILING, REFUSED)]
        assert sorted(metrics) == [f"site-{p}" for p in pids]
        previous = INITIAL if rnd == 1 else aggregate(recorded, rnd - 1)
        for p in pids:
            site = metrics[f"site-{p}"]
            assert site["server-round"] == rnd and site["round-offset"] == OFFSET
            assert site["epsilon"] == 0.5 * rnd + p and site["num-examples"] == examples(p)
            assert site["received-sum"] == pytest.approx(float(sum(v.double().sum() for v in previous.values())), abs=1e-5)
        if rnd == FAILING[0]:
            ((node, reason),) = failures.items()
            assert reason.startswith(Stage.COLLECT_MASKED_VECTORS) and "would clip" in reason
        elif rnd == REFUSED[0]:  # left out by the server as a dropout: the others' aggregate went through
            ((node, reason),) = failures.items()
            assert reason == f"{Stage.COLLECT_MASKED_VECTORS}: update refused: claims too much"
        else:
            assert failures == {}


class OneNodeGrid(Grid):
    """A grid with a single connected node that never receives a message."""

    run = SimpleNamespace(run_id=1)

    def set_run(self, run):
        raise AssertionError("not used")

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise AssertionError("not used")

    def get_node_ids(self):
        return [1]

    def push_messages(self, messages):
        raise AssertionError("no message may be sent with fewer than min_sites sites")

    def pull_messages(self, message_ids):
        raise AssertionError("not used")

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("no message may be sent with fewer than min_sites sites")


def test_too_few_sites_raise_a_clear_error():
    with pytest.raises(RuntimeError, match=r"at least 2 sites \(min_sites\), but only 1 connected"):
        run_secagg_rounds(
            OneNodeGrid(),
            initial_arrays=ArrayRecord(dict(INITIAL)),
            num_rounds=1,
            train_config={},
            evaluate_fn=lambda rnd, arrays: None,
            timeout=0.5,
        )


def test_integer_arrays_are_refused_before_anything_is_sent():
    with pytest.raises(ValueError, match="num_batches_tracked"):
        run_secagg_rounds(
            OneNodeGrid(),
            initial_arrays=ArrayRecord({"bn.num_batches_tracked": torch.tensor([3])}),
            num_rounds=1,
            train_config={},
            evaluate_fn=lambda rnd, arrays: None,
        )


def test_the_parameter_names_key_is_reserved_in_the_train_config():
    with pytest.raises(ValueError, match=f"reserved key '{PARAM_NAMES_KEY}'"):
        run_secagg_rounds(
            OneNodeGrid(),
            initial_arrays=ArrayRecord(dict(INITIAL)),
            num_rounds=1,
            train_config={PARAM_NAMES_KEY: "mine"},
            evaluate_fn=lambda rnd, arrays: None,
        )
