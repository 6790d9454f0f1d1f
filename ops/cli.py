"""The ``fedlens`` command line.

Subcommands register themselves from the package that owns them; heavy imports
(torch, Flower, Ray) happen only inside the command that needs them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fedlens.shared.config import FedConfig, config_help
from fedlens.shared.errors import FedlensError

from .cli_common import add_config_args, default_out, print_result, resolve_config, run_target

__all__ = ["main", "build_parser"]


def _cmd_simulate(args: argparse.Namespace) -> int:
    from fedlens.simulations.runner import simulate

    cfg, out = run_target(args, "simulate")
    summary = simulate(FedConfig(), out, resume=True) if cfg is None else simulate(cfg, out)
    print_result(summary, out)
    return 0


def _cmd_centralized(args: argparse.Namespace) -> int:
    from fedlens.simulations.runner import centralized

    # The baseline trains without DP-SGD, so it starts from dp = false and its non-private settings.
    cfg = resolve_config(args, preset={"dp": False})
    out = args.out or default_out("centralized")
    print_result(centralized(cfg, out), out)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    if args.keys:
        print(config_help())
        return 0
    print(resolve_config(args).to_toml(), end="")
    return 0


def _cmd_privacy_show(args: argparse.Namespace) -> int:
    import json

    from fedlens.shared.privacy import PrivacyLedger, site_guarantee

    ledger = PrivacyLedger(args.state_dir)
    if not ledger.path.is_file():
        raise FedlensError(f"no privacy ledger in {args.state_dir} (expected {ledger.path.name}); is this a site state folder?")
    entries = ledger.entries()
    # The one guarantee: every run's history composed in one accountant at the site's delta (not a sum over runs).
    guarantee = site_guarantee(entries) if entries else None
    if args.json:
        print(json.dumps({**ledger.to_dict(), "site": guarantee.to_dict() if guarantee else None}, indent=2))
        return 0
    print(f"privacy ledger {ledger.path}")
    print(f"{'run':<24} {'round':>5} {'sigma':>7} {'q':>8} {'steps':>6} {'epsilon':>8} {'delta':>8}  {'accountant':<10} {'site eps':>8}")
    for e in entries:
        site_eps = f"{e.site_epsilon:>8.3f}" if e.site_epsilon is not None else f"{'-':>8}"
        print(
            f"{e.run_id:<24} {e.round:>5} {e.noise_multiplier:>7.3f} {e.sample_rate:>8.5f} {e.steps:>6} {e.epsilon:>8.3f} "
            f"{e.delta:>8.1e}  {e.accountant:<10} {site_eps}"
        )
    print("(epsilon: each run's own, at its delta; site eps: every run so far composed, at the site's delta)")
    if guarantee is None:
        print("site: nothing spent yet")
    else:
        print(f"site: {guarantee.describe()}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from fedlens.shared.data import load_class_map
    from fedlens.shared.explain import DEFAULT_METHODS, ExplainOptions, explain

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else DEFAULT_METHODS
    if args.per_class < 1:
        raise FedlensError("--per-class must be at least 1")
    options = ExplainOptions(methods=methods, per_class=args.per_class, smoothgrad=args.smoothgrad, seed=args.seed)
    class_map = load_class_map(args.class_map) if args.class_map else None
    report = explain(args.model, args.data, args.out, options, class_map=class_map)
    perf = report["performance"]
    print(f"accuracy {perf['accuracy']:.4f}  macro-F1 {perf['macro_f1']:.4f} on {report['data']['images']} images")
    for name, t in report["trust"]["methods"].items():
        flag = "  FLAGGED by the randomisation check" if t["flagged"] else ""
        print(f"  {name:<22} faithfulness {t['faithfulness']:+.3f}  randomisation rho {t['randomisation_rank_correlation']:.2f}{flag}")
    print(f"report: {Path(args.out).resolve() / 'report.html'}  ({report['seconds']:.0f}s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedlens",
        description="Federated fine-tuning of ImageNet-pretrained CNNs across sites that keep their images.",
        epilog="Config keys: run `fedlens config --keys`.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (including Flower's)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "simulate",
        help="run a federated simulation locally (Flower simulation engine)",
        description="Run a federated fine-tune with simulated sites on this machine.",
    )
    add_config_args(p)
    p.add_argument("--out", type=Path, help="run folder to create (default: runs/simulate-<time>)")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue an interrupted run from its last completed round")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser(
        "centralized",
        help="train the same model on the pooled data (the baseline)",
        description="Train on all data in one place, without DP-SGD: num-rounds rounds of local-epochs passes (at least "
        "local-steps steps each). It starts from dp = false, so the non-private settings apply to keys left unset.",
    )
    add_config_args(p)
    p.add_argument("--out", type=Path, help="run folder to create (default: runs/centralized-<time>)")
    p.set_defaults(func=_cmd_centralized)

    p = sub.add_parser(
        "config", help="print the resolved config, or every key with --keys", description="Show the configuration a command would run with."
    )
    add_config_args(p)
    p.add_argument("--keys", action="store_true", help="list every key with its default and meaning")
    p.set_defaults(func=_cmd_config)
    p = sub.add_parser("privacy", help="inspect a site's privacy ledger", description="Privacy ledger tools.")
    privacy = p.add_subparsers(dest="privacy_command", required=True, metavar="ACTION")
    show = privacy.add_parser(
        "show",
        help="print the epsilon a site has spent, round by round",
        description="Print a site's privacy ledger (one line per DP-SGD round).",
    )
    show.add_argument("state_dir", type=Path, metavar="STATE_DIR", help="the site's state folder")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=_cmd_privacy_show)

    from fedlens.shared.explain.methods import method_names

    p = sub.add_parser(
        "explain",
        help="explainability report (Captum) of a model on labelled images",
        description="Write a self-contained HTML report (and report.json): model card, performance, "
        "attribution maps and how far to trust each method. Runs where the images are.",
    )
    p.add_argument("--model", type=Path, required=True, metavar="MODEL_OR_RUN_DIR", help="model.safetensors or a run folder")
    p.add_argument(
        "--data", required=True, metavar="DIR|fashion-mnist", help="image folder (one sub-folder per class) or fashion-mnist (test split)"
    )
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument(
        "--class-map", type=Path, metavar="MAP.toml", help="the folder's own class names mapped onto the model's (a site's class map)"
    )
    p.add_argument("--methods", help=f"comma list (default all): {','.join(method_names())}")
    p.add_argument("--per-class", type=int, default=10, help="images explained per class (default 10)")
    p.add_argument("--smoothgrad", type=int, default=0, metavar="N", help="SmoothGrad noise tunnel on Integrated Gradients with N samples")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_explain)

    from .data_cli import add_commands as add_data_commands
    from .model_cli import add_commands as add_model_commands
    from .serve_cli import add_commands as add_serve_commands
    from .server_cli import add_commands as add_server_commands
    from .site_cli import add_commands as add_client_commands

    add_model_commands(sub)
    add_serve_commands(sub)
    add_server_commands(sub)
    add_client_commands(sub)
    add_data_commands(sub)
    return parser


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    logger = logging.getLogger("fedlens")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedlens`` console script."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except FedlensError as exc:
        print(f"fedlens: error: {exc}", file=sys.stderr)
        return 1 if type(exc).__name__ == "SimulationFailed" else 2
    except KeyboardInterrupt:
        print("fedlens: interrupted; continue a run with `fedlens simulate --resume DIR` (or `fedlens run --resume DIR`)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
