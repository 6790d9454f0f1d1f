"""``fedlens client start|approve|apps|audit``: the commands a site's IT admin runs."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fedlens.shared.config import DEFAULT_DELTA, DEFAULT_MAX_IMAGE_PIXELS

from .audit_cli import add_audit_command
from .supernode import DEFAULT_APP_PORT

__all__ = ["add_commands"]

_log = logging.getLogger("fedlens.client")


def _cmd_client_start(args: argparse.Namespace) -> int:
    from fedlens.shared.errors import FedlensError
    from fedlens.shared.privacy.audit import SiteAudit

    from .supernode import INSECURE_BANNER, SiteSettings, check_server, check_site, run_supernode

    if args.insecure == bool(args.ca):
        raise FedlensError(
            "give the federation's CA and this site's key with --ca ca.pem --key SITE.key (or --insecure on a closed test network)"
        )
    if args.ca and not args.key:
        raise FedlensError("--key SITE.key is required with --ca (site authentication); create it with `fedlens certs add-site`")
    name = args.name or (args.key.stem if args.key else "site")
    settings = SiteSettings(
        server=args.server,
        data=args.data,
        state_dir=args.state_dir,
        name=name,
        ca=None if args.insecure else args.ca,
        key=None if args.insecure else args.key,
        max_epsilon=args.max_epsilon,
        delta=args.delta,
        allow_evaluation=args.allow_evaluation,
        allow_non_private=args.allow_non_private,
        device=args.device,
        port=args.port,
        class_map=args.class_map,
        max_image_pixels=args.max_image_pixels,
    )
    if args.insecure:
        _log.warning(INSECURE_BANNER)
    images = check_site(settings)
    _log.info(
        "%s: %d images in %s; privacy budget epsilon %g at delta %g; ledger in %s",
        name,
        images,
        args.data,
        args.max_epsilon,
        args.delta,
        args.state_dir,
    )
    _log.info("%s: %s", name, check_server(args.server, settings.ca))
    return run_supernode(settings, on_run=SiteAudit(args.state_dir).run_seen)


def _cmd_client_approve(args: argparse.Namespace) -> int:
    import getpass

    from .executor import AppApprovals

    AppApprovals(args.state_dir).approve(args.app_hash, by=getpass.getuser(), note=args.note)
    print(f"approved app {args.app_hash.strip().lower()} for the site in {args.state_dir}; it takes effect at the next task")
    return 0


def _cmd_client_apps(args: argparse.Namespace) -> int:
    import json

    from .executor import AppApprovals

    apps = AppApprovals(args.state_dir).approved()
    if args.json:
        print(json.dumps(apps, indent=2))
        return 0
    print(f"{'app hash':<64}  {'approved by':<12} {'at':<25} note")
    for fab_hash, info in apps.items():
        print(f"{fab_hash:<64}  {info.get('by') or '':<12} {info.get('at') or '':<25} {info.get('note') or ''}")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the site's commands on the ``fedlens`` parser."""
    p = sub.add_parser(
        "client",
        help="run a site's client (it trains on the site's images; they never leave)",
        description="A data site's connection to the federation (Flower SuperNode).",
    )
    client = p.add_subparsers(dest="client_command", required=True, metavar="ACTION")
    add_audit_command(client)
    q = client.add_parser(
        "start",
        help="connect this site to the server and serve training rounds",
        description="Check the site's set-up and the server's certificate, then run the site in the foreground. "
        "Data path, privacy budget and device are site settings the server cannot override.",
    )
    q.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's address, as named in its certificate")
    q.add_argument("--ca", type=Path, help="the federation's ca.pem (from the server admin)")
    q.add_argument("--key", type=Path, help="this site's private key SITE.key (from `fedlens certs add-site`)")
    q.add_argument("--data", type=Path, required=True, help="image folder: one sub-folder per class")
    q.add_argument("--state-dir", type=Path, required=True, help="this site's persistent state (privacy ledger)")
    q.add_argument(
        "--class-map",
        type=Path,
        metavar="MAP.toml",
        help='this site\'s names for the federation\'s classes: `local folder = "federation class"` or `= "ignore"` per line',
    )
    q.add_argument("--name", help="site name (default: the key file's name)")
    q.add_argument("--max-epsilon", type=float, default=8.0, help="this site's total privacy budget across all runs (default 8)")
    q.add_argument("--delta", type=float, default=DEFAULT_DELTA, help="this site's delta (the stricter of this and the run's wins)")
    q.add_argument("--allow-evaluation", action="store_true", help="release accuracy on the site's held-out images (not covered by DP)")
    q.add_argument("--allow-non-private", action="store_true", help="join runs without DP-SGD (off: such runs are refused)")
    q.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = CUDA when present")
    q.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="skip images (and DICOM frames) with more pixels than this as decompression bombs (default %(default)s)",
    )
    q.add_argument(
        "--port",
        type=int,
        default=DEFAULT_APP_PORT,
        help="local port of the site's app runtime (default %(default)s; unique per site on one host)",
    )
    q.add_argument("--insecure", action="store_true", help="plaintext, no authentication: closed test networks only")
    q.set_defaults(func=_cmd_client_start)
    q = client.add_parser(
        "approve",
        help="let this site run one more app build (by its hash)",
        description="Approve an app build by its SHA-256, as a refused run prints it in the site's log. "
        "Approve only a build you rebuilt yourself from its release tag (`flwr build`; builds are deterministic) "
        "and compared: an approved app's code runs at this site, budget checks included.",
    )
    q.add_argument("app_hash", metavar="HASH", help="the app's SHA-256 (64 hex digits)")
    q.add_argument("--state-dir", type=Path, required=True, help="this site's state folder")
    q.add_argument("--note", default="", help="why (kept with the approval)")
    q.set_defaults(func=_cmd_client_approve)
    q = client.add_parser(
        "apps",
        help="list the app builds this site runs",
        description="The apps this site runs: its own installed fedlens release's, and any approved.",
    )
    q.add_argument("--state-dir", type=Path, required=True, help="this site's state folder")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_cmd_client_apps)
