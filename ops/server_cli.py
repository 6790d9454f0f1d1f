"""``fedlens certs ...``, ``fedlens server ...`` and ``fedlens run``: the server host's commands."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from fedlens.shared.errors import FedlensError
from fedlens.shared.rundir import RunDir

from .cli_common import add_config_args, print_result, run_target
from .control import Connection
from .superlink import DEFAULT_INTERNAL_PORT, DEFAULT_PORT

__all__ = ["add_commands"]

_log = logging.getLogger("fedlens.server")


def _cmd_certs_init(args: argparse.Namespace) -> int:
    from .certs import init_ca, parse_server_names

    paths = init_ca(args.out, parse_server_names(args.server_name), days=args.days, force=args.force)
    print(f"CA certificate   {paths.ca_cert}   (give a copy to every site: --ca)")
    print(f"CA key           {paths.ca_key}   (keep offline; 0600)")
    print(f"server cert/key  {paths.server_cert}, {paths.server_key}   (for `fedlens server start --certs {paths.root}`)")
    return 0


def _cmd_certs_add_site(args: argparse.Namespace) -> int:
    from .certs import add_site

    private, public = add_site(args.out, args.site, force=args.force)
    print(f"site key  {private}   (send to {args.site} only, over a secure channel; 0600)")
    print(f"public    {public}   (register it: fedlens server add-site {args.site} {public} --state-dir DIR)")
    return 0


def _cmd_server_start(args: argparse.Namespace) -> int:
    from .superlink import ServerFailed, ServerSettings, start_server

    settings = ServerSettings(
        state_dir=args.state_dir, certs=args.certs, host=args.host, port=args.port, insecure=args.insecure, internal_port=args.internal_port
    )
    try:
        return start_server(settings)
    except ServerFailed as exc:
        _log.error("%s", exc)
        return 1


def _cmd_server_add_site(args: argparse.Namespace) -> int:
    from .superlink import add_site

    node = add_site(args.state_dir, args.site, args.public_key)
    print(f"registered {args.site} (node {node}); it can now connect with its private key")
    return 0


def _cmd_server_remove_site(args: argparse.Namespace) -> int:
    from .superlink import remove_site

    node = remove_site(args.state_dir, args.site)
    print(f"removed {args.site} (node {node}); its key is no longer accepted")
    return 0


def _cmd_server_sites(args: argparse.Namespace) -> int:
    from .superlink import list_sites

    sites = list_sites(args.state_dir)
    if args.json:
        print(json.dumps(sites, indent=2))
        return 0
    print(f"{'site':<24} {'status':<12} {'node id':<22} added")
    for name, info in sites.items():
        print(f"{name:<24} {info['status']:<12} {info['node_id']:<22} {info['added']}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:

    from .launch import launch

    cfg, out = run_target(args, "run")
    if cfg is None:
        cfg = RunDir(out).config()
    elif (out / "config.toml").exists():
        raise FedlensError(f"{out} already holds a run; continue it with `--resume {out}` or pass another `--out`")
    if cfg.attack != "none" or cfg.attack_sites:
        raise FedlensError("`attack` and `attack-sites` are for simulations only (`fedlens simulate`); remove them to run a deployment")
    conn = _operator_connection(args)
    summary = launch(conn, cfg, out, max_restarts=args.max_restarts, reconnect_timeout=args.reconnect_timeout)
    print_result(summary, out)
    return 0


def _operator_connection(args: argparse.Namespace) -> Connection:
    """How ``fedlens run`` reaches the SuperLink: from the server's ``server.json`` (``--state-dir``), or as given."""
    from .superlink import server_connection

    if args.state_dir is not None:
        if args.server or args.ca or args.insecure:
            raise FedlensError("--state-dir reads the server's address and CA from its server.json; drop --server, --ca and --insecure")
        return server_connection(args.state_dir)
    if not args.server:
        raise FedlensError(
            "give the server's --state-dir (on the server host: `fedlens run --state-dir STATE_DIR ...`), "
            f"or --server 127.0.0.1:INTERNAL_PORT (default {DEFAULT_INTERNAL_PORT}) with --ca"
        )
    if args.insecure == bool(args.ca):
        raise FedlensError("give the federation's CA with --ca ca.pem (or --insecure for a plaintext test server)")
    return Connection(args.server, None if args.insecure else args.ca)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the server host's commands on the ``fedlens`` parser."""
    p = sub.add_parser(
        "certs",
        help="create the federation's CA, server certificate and site keys",
        description="Certificates and keys for a federation (TLS + site authentication).",
    )
    certs = p.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    q = certs.add_parser(
        "init", help="a CA and a server certificate", description="Create ca.pem/ca.key and server.pem/server.key in --out."
    )
    q.add_argument("--out", type=Path, required=True, help="certificate folder to create")
    q.add_argument(
        "--server-name",
        required=True,
        metavar="NAME[,NAME...]",
        help="DNS names and IP addresses sites dial (become the certificate's SANs)",
    )
    q.add_argument("--days", type=int, default=825, help="validity of the certificates (default 825)")
    q.add_argument("--force", action="store_true", help="replace existing keys (every site then needs the new ca.pem)")
    q.set_defaults(func=_cmd_certs_init)
    q = certs.add_parser(
        "add-site", help="a site's authentication key pair", description="Create sites/SITE.key (private) and sites/SITE.pub in --out."
    )
    q.add_argument("site", metavar="SITE", help="site name (letters, digits, . _ -)")
    q.add_argument("--out", type=Path, required=True, help="certificate folder (from `certs init`)")
    q.add_argument("--force", action="store_true", help="replace the site's existing key")
    q.set_defaults(func=_cmd_certs_add_site)

    p = sub.add_parser(
        "server", help="run the federation server and manage its sites", description="The federation server (Flower SuperLink)."
    )
    server = p.add_subparsers(dest="server_command", required=True, metavar="ACTION")
    q = server.add_parser(
        "start",
        help="start the server (TLS and site authentication on)",
        description="Start the server in the foreground: the SuperLink on 127.0.0.1:--internal-port (operator commands), "
        "behind a front door on --host:--port that serves the sites and nothing else; TLS, site authentication and "
        "persistent state.",
    )
    q.add_argument("--certs", type=Path, help="certificate folder from `fedlens certs init`")
    q.add_argument("--state-dir", type=Path, required=True, help="persistent server state (database, site registry)")
    q.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    q.add_argument("--port", type=int, default=DEFAULT_PORT, help="the port sites dial: the front door (default %(default)s)")
    q.add_argument(
        "--internal-port",
        type=int,
        default=DEFAULT_INTERNAL_PORT,
        help="the SuperLink's port on 127.0.0.1, for operator commands on this host (default %(default)s)",
    )
    q.add_argument("--insecure", action="store_true", help="plaintext, no site authentication: closed test networks only")
    q.set_defaults(func=_cmd_server_start)
    for name, helptext, func in (
        ("add-site", "register a site's public key", _cmd_server_add_site),
        ("remove-site", "revoke a site (its key stops working)", _cmd_server_remove_site),
    ):
        q = server.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        q.add_argument("site", metavar="SITE")
        if name == "add-site":
            q.add_argument("public_key", type=Path, metavar="PUBLIC_KEY", help="the site's SITE.pub")
        q.add_argument("--state-dir", type=Path, required=True, help="the server's --state-dir")
        q.set_defaults(func=func)
    q = server.add_parser("sites", help="list registered sites and whether they are online", description="List registered sites.")
    q.add_argument("--state-dir", type=Path, required=True, help="the server's --state-dir")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_cmd_server_sites)

    p = sub.add_parser(
        "run",
        help="submit a training run to a running server and follow it",
        description="Submit a federated run to the server, stream its progress and write the run folder "
        "(on the server host). Resumes by itself after a server restart. Runs are submitted to the SuperLink's "
        "loopback port, never through the port the sites dial.",
    )
    p.add_argument("--state-dir", type=Path, help="the server's --state-dir: its server.json says how to reach it (recommended)")
    p.add_argument(
        "--server",
        metavar="HOST:PORT",
        help=f"the SuperLink's operator address instead of --state-dir, e.g. 127.0.0.1:{DEFAULT_INTERNAL_PORT} (not the sites' port)",
    )
    p.add_argument("--ca", type=Path, help="with --server: the federation's ca.pem")
    p.add_argument("--insecure", action="store_true", help="with --server: plaintext server (started with --insecure)")
    add_config_args(p)
    p.add_argument("--out", type=Path, help="run folder to create (default: runs/run-<time>)")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue an interrupted run")
    p.add_argument("--max-restarts", type=int, default=3, help="resubmit after a server restart this many times (default 3)")
    p.add_argument("--reconnect-timeout", type=float, default=300.0, help="seconds to wait for a lost server (default 300)")
    p.set_defaults(func=_cmd_run)
