"""A real server and real sites as separate processes on loopback, TLS and site authentication on."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import signal
import subprocess

import pytest

from fedlens.ops.certs import CertPaths, init_ca, issue_server_cert
from fedlens.ops.procs import Procs, flower_env, free_port, listening, tree, wait_for
from fedlens.ops.superlink import ServerSettings, superlink_command
from fedlens.shared.checkpoint import read_checkpoint_meta
from fedlens.shared.config import FedConfig
from fedlens.shared.data.samples import SAMPLE_CLASSES
from fedlens.shared.explain import ExplainOptions, explain
from fedlens.shared.privacy import PrivacyLedger

from .conftest import RUN, SITES, Federation

pytestmark = pytest.mark.deployment


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def test_three_sites_two_rounds_over_tls(federation: Federation, tmp_path):
    for site in SITES:
        federation.start_site(site)
    wait_for(lambda: federation.online() == set(SITES), 90, "three sites online")
    out = tmp_path / "run"
    run = federation.start_run(out)
    assert run.wait(timeout=600) == 0, federation.procs.log("run")[-3000:]
    summary = _summary(out)
    assert summary["rounds"] == 2 and summary["sites"] == SITES
    assert 0.0 <= summary["final_accuracy"] <= 1.0 and math.isfinite(summary["final_loss"])
    assert summary["private"] and summary["privacy"]["max_site_epsilon"] <= 8.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(set(r["sites_train"]) == set(SITES) for r in records)
    for name in ("model.safetensors", "config.toml", "accuracy.png"):
        assert (out / name).is_file(), name
    for site in SITES:  # every site's ledger holds both rounds, at the site
        entries = PrivacyLedger(federation.root / "state" / site).entries()
        assert [e.round for e in entries] == [1, 2]
    log = federation.procs.log("run")
    assert "round 2/2" in log and "final accuracy" in log
    # Flower's fixed 3 s polls are shortened in the processes fedlens runs (fedlens.server.flower_waits).
    assert "server waits: asks for replies every 0.2 s, retries content still uploading after 0.1 s" in log
    for site in SITES:
        assert "SuperNode waits: asks for messages every 0.5 s" in federation.procs.log(site)
    # Each site kept the last global model and can explain it on its own images.
    kept = federation.root / "state" / "site-a" / "global-model.safetensors"
    meta = read_checkpoint_meta(kept)
    assert meta["round"] == 2 and meta["classes"] == sorted(SAMPLE_CLASSES) and meta["site"] == "site-a"
    report = explain(
        kept, str(federation.data["site-a"]), tmp_path / "site-report", ExplainOptions(methods=("saliency",), per_class=1, sanity_images=2)
    )
    assert report["data"]["images"] == 60 and (tmp_path / "site-report" / "report.html").is_file()


def _records(out):
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _checkpointed_round(out) -> int:
    path = out / "model.safetensors"
    return int(read_checkpoint_meta(path)["round"]) if path.is_file() else 0


def test_site_killed_mid_round_run_finishes_and_site_rejoins(federation: Federation, tmp_path):
    for site in SITES:
        federation.start_site(site)
    wait_for(lambda: federation.online() == set(SITES), 90, "three sites online")
    out = tmp_path / "run"
    run = federation.start_run(out, **{"num-rounds": 3, "round-timeout": 60.0})
    wait_for(lambda: "Receiving: train message" in federation.procs.log("site-c"), 180, "site-c to receive round 1")
    # Crash mid-round: the OOM killer takes `fedlens client start` alone. Its SuperNode must not
    # outlive it (it would take tasks no executor answers, and hold the site's port).
    client = federation.procs.procs["site-c"]
    supernodes = [pid for pid in tree(client.pid) if pid != client.pid]
    assert supernodes, "site-c's SuperNode was not found"
    os.kill(client.pid, signal.SIGKILL)
    client.wait(timeout=10)
    wait_for(lambda: not any(_alive(pid) for pid in supernodes), 60, "site-c's SuperNode to stop with its client")
    wait_for(lambda: len(_records(out)) >= 1, 240, "round 1 to complete without site-c")
    federation.start_site("site-c")  # the site comes back
    assert run.wait(timeout=600) == 0, federation.procs.log("run")[-3000:]
    records = _records(out)
    assert [r["round"] for r in records] == [1, 2, 3]
    assert set(records[0]["sites_train"]) == {"site-a", "site-b"} and records[0]["failures"]
    assert "site-c" in records[-1]["sites_train"], "the restarted site did not rejoin"
    assert _summary(out)["rounds"] == 3


def test_server_killed_after_round_1_resumes_from_checkpoint(federation: Federation, tmp_path):
    for site in SITES:
        federation.start_site(site)
    wait_for(lambda: federation.online() == set(SITES), 90, "three sites online")
    out = tmp_path / "run"
    run = federation.start_run(out, **{"num-rounds": 3})
    # Round 1 is complete once its checkpoint is on disk. Its metrics line is written just
    # before; a kill between the two makes the resumed run redo round 1, by design.
    wait_for(lambda: _checkpointed_round(out) >= 1, 240, "round 1")
    federation.procs.stop("server", signal.SIGKILL)  # the server host crashes
    first = _records(out)
    federation.start_server()  # same state folder: database and site registry survive
    assert run.wait(timeout=600) == 0, federation.procs.log("run")[-3000:]
    records = _records(out)
    assert [r["round"] for r in records] == [1, 2, 3]  # nothing completed was lost or repeated
    assert records[0] == first[0]
    assert "resuming" in federation.procs.log("run")
    for site in SITES:  # a round re-sent after the restart is not paid for twice
        entries = PrivacyLedger(federation.root / "state" / site).entries()
        assert sorted({e.round for e in entries}) == [1, 2, 3] and len(entries) == 3, entries


def _client(federation: Federation, name: str, *args: str, timeout: float = 90):
    """Run `fedlens client start` to its end (it must refuse) and return (exit code, output)."""
    proc = federation.procs.start(
        name,
        "client",
        "start",
        "--server",
        federation.address,
        "--data",
        str(federation.data["site-a"]),
        "--state-dir",
        str(federation.root / "state" / name),
        *args,
    )
    code = proc.wait(timeout=timeout)
    return code, federation.procs.log(name)


def test_rejections_say_what_is_wrong_and_how_to_fix_it(federation: Federation, tmp_path):
    certs = federation.certs
    ca, key = str(certs / "ca.pem"), str(certs / "sites" / "site-a.key")

    code, out = _client(federation, "rogue", "--ca", ca, "--key", str(certs / "sites" / "rogue.key"))
    assert code == 3 and "not registered" in out and "fedlens server add-site" in out

    code, out = _client(federation, "plain", "--insecure")
    assert code == 2 and "requires TLS" in out and "drop --insecure" in out

    other = tmp_path / "other-ca"
    init_ca(other, ["127.0.0.1"])
    code, out = _client(federation, "other-ca", "--ca", str(other / "ca.pem"), "--key", key)
    assert code == 2 and "not signed by your CA" in out

    # Revoking a site: its (formerly valid) key stops working.
    r = federation.fedlens("server", "remove-site", "site-c", "--state-dir", str(federation.state))
    assert r.returncode == 0, r.stderr
    code, out = _client(federation, "revoked", "--ca", ca, "--key", str(certs / "sites" / "site-c.key"), "--name", "site-c")
    assert code == 3 and "not registered" in out


def _raw_superlink(federation: Federation, certs, tmp_path, name: str) -> int:
    """A SuperLink serving ``certs`` as they are (fedlens' own start-up checks skipped)."""
    port = free_port()
    settings = ServerSettings(state_dir=tmp_path / name, certs=certs, host="127.0.0.1", internal_port=port)
    (tmp_path / name).mkdir()
    raw = subprocess.Popen(
        superlink_command(settings),
        env=flower_env(FLWR_HOME=str(tmp_path / f"{name}-home")),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    federation.procs.procs[name] = raw
    wait_for(lambda: listening(port), 60, f"the {name} SuperLink")
    return port


def test_certificate_for_other_names_is_refused_by_the_site(federation: Federation, tmp_path):
    other = tmp_path / "other-name"
    init_ca(other, ["fl.example.org"])
    issue_server_cert(CertPaths(other), ["fl.example.org"], force=True)  # without the loopback names
    port = _raw_superlink(federation, other, tmp_path, "named-superlink")
    code, out = _client(
        federation,
        "wrong-name",
        "--ca",
        str(other / "ca.pem"),
        "--key",
        str(federation.certs / "sites" / "site-a.key"),
        "--server",
        f"127.0.0.1:{port}",
    )
    assert code == 2 and "does not cover the name you dial (127.0.0.1)" in out


def test_expired_server_certificate_is_refused_by_server_and_site(federation: Federation, tmp_path):
    expired = tmp_path / "expired"
    init_ca(expired, ["127.0.0.1"])
    issue_server_cert(CertPaths(expired), ["127.0.0.1"], days=1, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=30), force=True)
    r = federation.fedlens("server", "start", "--certs", str(expired), "--state-dir", str(tmp_path / "s2"), "--port", str(free_port()))
    assert r.returncode == 2 and "not now" in r.stderr and "--force" in r.stderr
    # A server that serves it anyway (started without fedlens' checks) is refused by the site.
    port = _raw_superlink(federation, expired, tmp_path, "expired-superlink")
    code, out = _client(
        federation,
        "sees-expired",
        "--ca",
        str(expired / "ca.pem"),
        "--key",
        str(federation.certs / "sites" / "site-a.key"),
        "--server",
        f"127.0.0.1:{port}",
    )
    assert code == 2 and "has expired" in out


def test_insecure_mode_works_end_to_end_and_says_so(tmp_path, deploy_images, cache_dir):
    """`--insecure` (closed test networks): no TLS, no authentication, loud about it, still a real run."""
    env = flower_env(FLWR_HOME=str(tmp_path / "home"))
    procs = Procs(tmp_path / "logs", env)
    port = free_port()
    try:
        procs.start(
            "server",
            "server",
            "start",
            "--insecure",
            "--state-dir",
            str(tmp_path / "server"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--internal-port",
            str(free_port()),
        )
        wait_for(lambda: listening(port), 60, "the insecure server")
        for site in ("site-a", "site-b"):
            procs.start(
                site,
                "client",
                "start",
                "--insecure",
                "--server",
                f"127.0.0.1:{port}",
                "--data",
                str(deploy_images[site]),
                "--state-dir",
                str(tmp_path / site),
                "--name",
                site,
                "--allow-evaluation",
                "--port",
                str(free_port()),
            )
        cfg = FedConfig.from_mapping({**RUN, "num-rounds": 1, "data-path": str(deploy_images["server"]), "cache-dir": cache_dir})
        (tmp_path / "run.toml").write_text(cfg.to_toml())
        run = procs.start(
            "run",
            "run",
            "--state-dir",
            str(tmp_path / "server"),
            "--config",
            str(tmp_path / "run.toml"),
            "--out",
            str(tmp_path / "run"),
        )
        assert run.wait(timeout=300) == 0, procs.log("run")[-3000:]
        assert _summary(tmp_path / "run")["rounds"] == 1
        assert "INSECURE SERVER" in procs.log("server") and "INSECURE SITE" in procs.log("site-a")
    finally:
        procs.stop_all()


def _alive(pid: int) -> bool:
    """``pid`` runs (a zombie waiting for its parent to reap it has stopped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
