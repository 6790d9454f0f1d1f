"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path

from fedlens.shared.config import FedConfig, load_config, parse_overrides


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="TOML config file (defaults: the embedded ones)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--out", default="runs/bench", help="folder for the runs this benchmark makes")
    return p


def config(args: argparse.Namespace, *, defaults: Mapping[str, object] | None = None, **fixed: object) -> FedConfig:
    """Embedded defaults < the benchmark's ``defaults`` < --config < its ``fixed`` settings < --set."""
    base = load_config(args.config)
    if defaults:
        in_file = tomllib.loads(Path(args.config).read_text(encoding="utf-8")) if args.config else {}
        base = FedConfig.from_mapping({k: v for k, v in defaults.items() if k not in in_file}, base=base)
    with_fixed = FedConfig.from_mapping(fixed, base=base)
    return FedConfig.from_mapping(parse_overrides(args.set), base=with_fixed)


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    logger = logging.getLogger("fedlens")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def result(**values: object) -> None:
    """Print the closing ``RESULT name=value ...`` line."""
    parts = [f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()]
    print("RESULT " + " ".join(parts), flush=True)


def _tree_sum(pid: int, proc_file: str, value: Callable[[str], int]) -> int:
    """Sum of ``value(text of /proc/<p>/<proc_file>)`` over ``pid`` and its descendants alive now."""
    from fedlens.ops.procs import tree

    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/{proc_file}") as f:
                total += value(f.read())
        except (OSError, IndexError, ValueError):
            continue  # ended meanwhile
    return total


def tree_rss(pid: int) -> int:
    """Resident bytes (RSS) of ``pid`` and all its descendants alive now."""
    page = os.sysconf("SC_PAGE_SIZE")
    return _tree_sum(pid, "statm", lambda text: int(text.split()[1]) * page)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its descendants.

    A descendant alive now counts itself; one that has ended and was waited for counts in
    its parent's children's time, so a process that ran and exited between two calls (a
    run's ServerApp) is counted once.
    """

    def ticks(text: str) -> int:
        fields = text.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime

    return _tree_sum(pid, "stat", ticks) / os.sysconf("SC_CLK_TCK")


class PeakRss:
    """Sample :func:`tree_rss` of a process tree every ``interval`` seconds; ``peak`` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak
