"""Sites are named by the server's registry, never by what a site says about itself."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedlens.server.guard import SiteGuard
from fedlens.server.sites import RegistryNamedGrid, ShortPollGrid, SiteRegistry
from fedlens.shared.protocol import NUM_EXAMPLES, SITE_RECORD, SITE_REGISTRY_ENV


def _reply(node: int, *, claims: str | None = None, error: str | None = None, epsilon: float = 1.0) -> Message:
    """A site's reply as the ServerApp receives it: from ``node`` (the SuperLink's authenticated id)."""
    md = Metadata(
        run_id=1,
        message_id=f"r{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id=f"i{node}",
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type="train",
    )
    if error is not None:
        return Message(error=Error(code=0, reason=error), metadata=md)
    content = RecordDict({"arrays": ArrayRecord({"w": torch.ones(2)}), "metrics": MetricRecord({NUM_EXAMPLES: 10, "epsilon": epsilon})})
    if claims is not None:
        content[SITE_RECORD] = ConfigRecord({"name": claims})
    return Message(content=content, metadata=md)


def _write(path: Path, sites: dict[str, int]) -> None:
    path.write_text(json.dumps({name: {"node_id": str(node), "key_sha256": "x", "added": "t"} for name, node in sites.items()}))


def test_the_registry_names_sites_whatever_they_claim(tmp_path, caplog):
    registry_file = tmp_path / "sites.json"
    _write(registry_file, {"hospital-a": 11, "hospital-b": 12})
    guard = SiteGuard(FedAvg(), SiteRegistry(registry_file))
    guard._sent = [11, 12, 13, 14, 15]
    # Added while the run goes on: the guard reads the registry again for a node it does not know.
    _write(registry_file, {"hospital-a": 11, "hospital-b": 12, "clinic-c": 14, "clinic-e": 15})
    replies = [
        _reply(11, claims="hospital-b", epsilon=1.1),  # each claims to be the other
        _reply(12, claims="hospital-a", epsilon=1.2),
        _reply(13, claims="hospital-a", epsilon=1.3),  # a node nobody registered
        _reply(14, error="SiteRefusal: budget"),  # failures carry no content: named by node id alone
    ]
    with caplog.at_level(logging.WARNING, logger="fedlens.server"):
        arrays, _ = guard.aggregate_train(1, replies)
    assert arrays is not None
    train = guard.current.train
    assert set(train) == {"hospital-a", "hospital-b", "unregistered-node-13"}
    assert train["hospital-a"]["epsilon"] == 1.1 and train["hospital-b"]["epsilon"] == 1.2
    failures = guard.round_failures()
    assert set(failures) == {"clinic-c", "clinic-e"}
    assert "SiteRefusal" in failures["clinic-c"] and "no reply" in failures["clinic-e"]
    assert "node 13 is not in the site registry" in caplog.text


def test_a_removed_site_keeps_its_name_for_the_run(tmp_path):
    registry_file = tmp_path / "sites.json"
    _write(registry_file, {"hospital-a": 11})
    registry = SiteRegistry(registry_file)
    assert registry.name(11) == "hospital-a"
    _write(registry_file, {})  # `fedlens server remove-site hospital-a`
    assert registry.name(11) == "hospital-a"
    assert registry.name(12) == "unregistered-node-12"


def test_an_unreadable_registry_does_not_stop_the_run_and_says_so(tmp_path, caplog):
    registry_file = tmp_path / "sites.json"
    registry_file.write_text("{not json")
    with caplog.at_level(logging.ERROR, logger="fedlens.server"):
        assert SiteRegistry(registry_file).name(11) == "unregistered-node-11"
    assert "cannot read the site registry" in caplog.text


def test_the_registry_comes_from_the_environment_fedlens_server_start_sets(tmp_path):
    assert SiteRegistry.from_env({}) is None
    registry = SiteRegistry.from_env({SITE_REGISTRY_ENV: str(tmp_path / "sites.json")})
    assert registry is not None and registry.path == tmp_path / "sites.json"


def test_without_a_registry_sites_keep_the_names_they_report():
    """Simulation (and --insecure servers): the site-N names the sites report."""
    guard = SiteGuard(FedAvg())
    guard._sent = [1, 2, 3]
    guard.aggregate_train(1, [_reply(1, claims="site-0"), _reply(2, claims="site-1"), _reply(3, claims="site-1")])
    assert set(guard.current.train) == {"site-0", "site-1", "site-1@3"}


class _Replies:
    """A grid that answers with fixed replies (the SuperLink's side is not under test)."""

    def __init__(self, replies: list[Message]) -> None:
        self.replies = replies

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        return list(self.replies)

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        return list(self.replies)


@pytest.mark.parametrize("call", ["send_and_receive", "pull_messages"])
def test_the_named_grid_stamps_the_registry_name_into_every_reply(tmp_path, call):
    registry_file = tmp_path / "sites.json"
    _write(registry_file, {"hospital-a": 11})
    inner = _Replies([_reply(11, claims="hospital-b"), _reply(12), _reply(13, error="boom")])
    grid = RegistryNamedGrid(inner, SiteRegistry(registry_file))  # type: ignore[arg-type]
    replies = list(grid.send_and_receive([], timeout=1.0) if call == "send_and_receive" else grid.pull_messages([]))
    assert replies[0].content.config_records[SITE_RECORD]["name"] == "hospital-a"
    assert replies[1].content.config_records[SITE_RECORD]["name"] == "unregistered-node-12"
    assert replies[2].has_error()


class _SlowSites:
    """A grid whose replies come in one per pull (the SuperLink's side is not under test)."""

    def __init__(self, replies: list[Message]) -> None:
        self.replies = replies
        self.pulls = 0

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        return [f"i{m.metadata.dst_node_id}" for m in messages]

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        self.pulls += 1
        ready = [r for r in self.replies if r.metadata.reply_to_message_id in set(message_ids)]
        return ready[:1]


def _instruction(node: int) -> Message:
    md = Metadata(
        run_id=1,
        message_id="",
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type="train",
    )
    return Message(content=RecordDict(), metadata=md)


def test_the_short_poll_grid_waits_for_every_reply_and_no_longer():
    inner = _SlowSites([_reply(11), _reply(12), _reply(13, error="refused")])
    grid = ShortPollGrid(inner, poll_s=0.0)  # type: ignore[arg-type]
    replies = list(grid.send_and_receive([_instruction(n) for n in (11, 12, 13)], timeout=None))
    assert sorted(r.metadata.src_node_id for r in replies) == [11, 12, 13]
    assert inner.pulls == 3  # it stops asking once every reply is in


def test_the_short_poll_grid_returns_what_came_when_the_round_times_out():
    inner = _SlowSites([_reply(11)])  # node 12 never answers
    replies = list(ShortPollGrid(inner, poll_s=0.01).send_and_receive([_instruction(11), _instruction(12)], timeout=0.3))  # type: ignore[arg-type]
    assert [r.metadata.src_node_id for r in replies] == [11]
    assert inner.pulls > 1
