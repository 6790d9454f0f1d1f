"""Who the sites are: waiting for them to connect, and their names from the server's registry."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from fedlens.shared.protocol import SITE_RECORD, SITE_REGISTRY_ENV

__all__ = ["SiteRegistry", "RegistryNamedGrid", "ShortPollGrid", "wait_for_sites", "clean_site_name"]

_log = logging.getLogger("fedlens.server")


def wait_for_sites(grid: Grid, expected: int, *, wait_s: float) -> set[int]:
    """Poll ``grid`` until ``expected`` sites are connected or ``wait_s`` passed; return the connected node ids."""
    deadline = time.monotonic() + wait_s
    last_log = 0.0
    while len(nodes := set(grid.get_node_ids())) < expected and (now := time.monotonic()) < deadline:
        if now - last_log >= 10.0:
            _log.info("waiting for sites: %d of %d connected", len(nodes), expected)
            last_log = now
        time.sleep(0.2)
    return nodes


def clean_site_name(raw: object) -> str | None:
    """A self-reported site name fit for logs and JSON keys (word characters and ``.@+-``, at most 64), or None."""
    if not isinstance(raw, str) or not raw.strip():
        return None
    return re.sub(r"[^\w.@+-]", "_", raw.strip())[:64]


class SiteRegistry:
    """Site names by node id, from the server's registry (``sites.json``).

    ``fedlens server add-site NAME KEY`` registers ``KEY`` with the SuperLink and
    records the node id it got under ``NAME``. With site authentication, a reply from
    that node id was signed with that key, so the registry, not the site, says who
    answered: a site cannot report in another site's name.

    Parameters
    ----------
    path : Path
        The registry file, ``{"<name>": {"node_id": "<id>", ...}, ...}``.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._names: dict[int, str] = {}
        self._warned: set[int] = set()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SiteRegistry | None:
        """The registry named by :data:`SITE_REGISTRY_ENV` (set by ``fedlens server start``), or None."""
        path = (os.environ if environ is None else environ).get(SITE_REGISTRY_ENV, "")
        return cls(Path(path)) if path else None

    def name(self, node: int) -> str:
        """The registered name of ``node``; ``unregistered-node-<id>`` for a node not in the registry.

        A name once known stays for this process: a site removed mid-run is still
        reported under its name.
        """
        if node not in self._names:
            self._reload()
        if node in self._names:
            return self._names[node]
        if node not in self._warned:
            self._warned.add(node)
            _log.warning("node %d is not in the site registry %s; it is reported as unregistered-node-%d", node, self.path, node)
        return f"unregistered-node-{node}"

    def _reload(self) -> None:
        """Read the registry again (a site may have been added since)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        except (OSError, ValueError) as exc:
            _log.error("cannot read the site registry %s (%s); sites it would name are reported by node id", self.path, exc)
            return
        for site, info in data.items():
            try:
                self._names[int(info["node_id"])] = str(site)
            except (KeyError, TypeError, ValueError):
                _log.error("site registry %s: entry %r has no valid node_id; ignored", self.path, site)


class DelegatingGrid(Grid):
    """A Grid that forwards every call to ``grid``: wrappers override only what they watch."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run):  # type: ignore[no-untyped-def]
        self._grid.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class ShortPollGrid(DelegatingGrid):
    """Delegate to ``grid``, but wait for replies by asking for them every ``poll_s`` seconds.

    Flower 1.42's deployed grid (``HttpGrid``) asks the SuperLink for replies every
    3 s, a constant in its ``send_and_receive``; a reply waits 1.5 s on average to be
    seen, twice per round. This is the same ``send_and_receive`` (push, then pull
    until every reply is in or ``timeout`` passed), built on the grid's public
    ``push_messages`` and ``pull_messages``, with a shorter wait.

    Parameters
    ----------
    grid : Grid
        The ServerApp's grid.
    poll_s : float, default 0.2
        Seconds between two pulls while replies are missing. Each pull is one request
        to the SuperLink on the server host.
    """

    def __init__(self, grid: Grid, *, poll_s: float = 0.2) -> None:
        super().__init__(grid)
        self.poll_s = poll_s

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while deadline is None or time.monotonic() < deadline:
            pulled = list(self.pull_messages(waiting))
            replies.extend(pulled)
            waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if not waiting:
                break
            time.sleep(self.poll_s if deadline is None else max(0.0, min(self.poll_s, deadline - time.monotonic())))
        return replies


class RegistryNamedGrid(DelegatingGrid):
    """Delegate to ``grid``; in every reply, replace the site's own name (:data:`SITE_RECORD`) with the registry's.

    For code that reads site names off replies (the SecAgg+ path), so that it names
    sites by the registry without knowing about it.
    """

    def __init__(self, grid: Grid, registry: SiteRegistry) -> None:
        super().__init__(grid)
        self.registry = registry

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._named(m) for m in self._grid.pull_messages(message_ids)]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return [self._named(m) for m in self._grid.send_and_receive(messages, timeout=timeout)]

    def _named(self, reply: Message) -> Message:
        if reply.has_content():
            reply.content[SITE_RECORD] = ConfigRecord({"name": self.registry.name(reply.metadata.src_node_id)})
        return reply
