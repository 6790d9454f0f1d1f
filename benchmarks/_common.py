"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import logging
import sys

from shared.config import FedConfig, load_config, parse_overrides


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="TOML config file (defaults: the embedded ones)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--out", default="runs/bench", help="folder for the runs this benchmark makes")
    return p


def config(args: argparse.Namespace, **fixed: object) -> FedConfig:
    """Defaults < --config < the benchmark's fixed settings < --set."""
    base = load_config(args.config)
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
