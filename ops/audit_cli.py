"""``fedlens client audit STATE_DIR``: read a site's audit log (runs seen, rounds trained or refused)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_audit_command"]


def _cell(value: Any, width: int) -> str:
    text = "-" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _epsilon(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def _cmd_client_audit(args: argparse.Namespace) -> int:
    import json

    from fedlens.shared.errors import FedlensError
    from fedlens.shared.privacy import SiteAudit

    audit = SiteAudit(args.state_dir)
    if not audit.path.is_file():
        raise FedlensError(f"no audit log in {args.state_dir} (expected {audit.path.name}); is this a site state folder?")
    records = audit.entries()
    unreadable = audit.unreadable_lines()
    if args.json:
        print(json.dumps({"path": str(audit.path), "entries": records, "unreadable_lines": unreadable}, indent=2))
        return 0
    print(f"audit log {audit.path}")
    print(f"{'time (UTC)':<24} {'run':<20} {'round':>5} {'outcome':<9} {'site eps':>8} {'bytes':>10} {'sha256':<16} reason")
    for r in records:
        if r.get("kind") == "run":
            outcome = "accepted" if r.get("accepted") else "refused"
            app = f"app {_cell(r.get('app_hash'), 16)}"
            print(
                f"{_cell(r.get('time'), 24):<24} {_cell(r.get('run_id'), 20):<20} {'run':>5} {outcome:<9} {'':>8} {'':>10} {app:<16} {r.get('reason', '')}"
            )
        else:
            print(
                f"{_cell(r.get('time'), 24):<24} {_cell(r.get('run_id'), 20):<20} {_cell(r.get('round'), 5):>5} "
                f"{_cell(r.get('outcome'), 9):<9} {_epsilon(r.get('epsilon_after')):>8} {_cell(r.get('bytes_sent'), 10):>10} "
                f"{_cell(r.get('sha256'), 16):<16} {r.get('reason', '')}"
            )
    runs = [r for r in records if r.get("kind") == "run"]
    rounds = [r for r in records if r.get("kind") == "round"]
    counts = {o: sum(1 for r in rounds if r.get("outcome") == o) for o in ("trained", "re-sent", "refused", "failed")}
    print(f"{len(runs)} run(s) seen; rounds: " + ", ".join(f"{n} {o}" for o, n in counts.items()))
    if unreadable:
        print(
            f"{len(unreadable)} unreadable line(s) skipped (line {', '.join(map(str, unreadable))}): "
            "a crash while writing leaves at most one per crash; more suggests the file was edited"
        )
    return 0


def add_audit_command(client_subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``audit`` on the ``fedlens client`` sub-command parser.

    Parameters
    ----------
    client_subparsers
        What ``add_subparsers()`` returned for the ``client`` command.
    """
    q = client_subparsers.add_parser(
        "audit",
        help="show this site's audit log: runs seen, rounds trained, re-sent or refused",
        description="Print a site's append-only audit log (audit.jsonl in its state folder): every run it was asked to "
        "join (app hash, accepted or refused, why) and every round (outcome, why, the site's epsilon after it with all "
        "runs composed, bytes and SHA-256 of the update sent).",
    )
    q.add_argument("state_dir", type=Path, metavar="STATE_DIR", help="the site's state folder")
    q.add_argument("--json", action="store_true", help="machine-readable output (every record as written)")
    q.set_defaults(func=_cmd_client_audit)
