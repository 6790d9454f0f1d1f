"""What several ``fedlens`` commands share: config arguments, run folders, the result lines."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fedlens.shared.config import FedConfig, load_config, parse_overrides
from fedlens.shared.errors import FedlensError
from fedlens.simulations import EXPERIMENTS_DIR

__all__ = ["add_config_args", "default_out", "print_result", "resolve_config", "run_target"]


def _experiments() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml"))


def resolve_config(args: argparse.Namespace, *, preset: dict[str, object] | None = None) -> FedConfig:
    path = args.config
    if getattr(args, "experiment", None):
        if path:
            raise FedlensError("give either --config or --experiment, not both")
        path = EXPERIMENTS_DIR / f"{args.experiment}.toml"
        if not path.is_file():
            raise FedlensError(f"unknown experiment {args.experiment!r}; available: {', '.join(_experiments())}")
    return load_config(path, parse_overrides(args.set or []), preset=preset)


def add_config_args(p: argparse.ArgumentParser, *, experiments: bool = True) -> None:
    p.add_argument("--config", type=Path, help="TOML file with config keys (kebab-case, flat)")
    if experiments:
        p.add_argument("--experiment", help=f"a bundled experiment overlay: {', '.join(_experiments())}")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one key (repeatable), e.g. --set num-rounds=3")


def default_out(kind: str) -> Path:
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_target(args: argparse.Namespace, kind: str) -> tuple[FedConfig | None, Path]:
    """``(config, run folder)`` of a run command; the config is ``None`` for ``--resume``
    (the run folder's own config applies)."""
    if args.resume:
        if args.config or args.set or args.experiment:
            raise FedlensError("--resume continues a run with its saved config; drop --config/--experiment/--set")
        return None, Path(args.resume)
    return resolve_config(args), Path(args.out or default_out(kind))


def print_result(summary: dict[str, object], out: str | Path) -> None:
    acc, f1 = summary.get("final_accuracy"), summary.get("final_macro_f1")
    accuracy = f"final accuracy {acc:.4f}  macro-F1 {f1:.4f}" if acc is not None else "no round completed"
    print(f"{accuracy}  ({summary['rounds']} rounds, {summary['wall_seconds']:.0f}s)")
    privacy = summary.get("privacy")
    if isinstance(privacy, dict):
        if privacy.get("private"):
            eps = privacy.get("max_site_epsilon")
            print(f"private: DP-SGD at every site, max site epsilon {eps:.3f} at delta {privacy['sample_level']['delta']:g}")
        else:
            print(f"NOT PRIVATE: {privacy.get('reason')}")
        if "central" in privacy:
            c = privacy["central"]
            print(f"central DP ({c['mode']} clipping): epsilon {c['epsilon']:.3f} of {c['budget_epsilon']:g} at delta {c['delta']:g}")
    if summary.get("stopped_early"):
        print(f"stopped early: {summary['stopped_early']}")
    print(f"artifacts: {Path(out).resolve()}")
    report = Path(out) / "report" / "report.html"
    if report.is_file():
        print(f"explainability report: {report.resolve()}")
