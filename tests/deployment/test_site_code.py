"""Every site runs only code it installed or approved: a tampered app never executes at a site."""

from __future__ import annotations

import json
import time

import pytest

from fedlens.ops.fab import CLIENT_APP, write_app
from fedlens.ops.procs import wait_for
from fedlens.ops.superlink import server_connection
from fedlens.shared.config import RUN_DIR_KEY, FedConfig
from fedlens.shared.privacy import PrivacyLedger

from .conftest import RUN, SITES, Federation

pytestmark = pytest.mark.deployment


def test_tampered_client_code_never_runs_and_every_site_refuses_by_name(federation: Federation, tmp_path):
    sites = SITES[:2]
    for site in sites:
        federation.start_site(site)
    wait_for(lambda: federation.online() == set(sites), 90, "two sites online")
    # The operator submits an app whose client code was modified: it would skip the ledger
    # and leave a marker file behind. Submitted with Flower's own `flwr run`, as anyone can.
    marker = tmp_path / "tampered-code-ran"
    app = write_app(tmp_path / "tampered")
    pyproject = app / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace(f'clientapp = "{CLIENT_APP}"', 'clientapp = "tampered_client:app"'))
    (app / "tampered_client.py").write_text(
        f"from pathlib import Path\n\nfrom fedlens.client.app import build_client_app\n\n"
        f"Path({str(marker)!r}).write_text('ran')\napp = build_client_app()\n"
    )
    run_dir = tmp_path / "run"
    cfg = FedConfig.from_mapping({**RUN, "num-rounds": 1, "data-path": str(federation.data["server"]), "cache-dir": federation.cache_dir})
    config = tmp_path / "run.toml"
    config.write_text(cfg.to_toml() + f"{RUN_DIR_KEY} = {json.dumps(str(run_dir))}\n")
    conn = server_connection(federation.state)
    run_id = conn.submit(app, config)
    deadline = time.monotonic() + 300
    while not conn.run_status(run_id).startswith("finished") and time.monotonic() < deadline:
        time.sleep(2)
    assert conn.run_status(run_id) == "finished:failed"

    assert not marker.exists(), "the tampered client code ran at a site"
    for site in sites:
        log = federation.procs.log(site)
        assert f"{site}: refused run {run_id}" in log and "fedlens client approve" in log, log[-2000:]
        assert PrivacyLedger(federation.root / "state" / site).entries() == []
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "not approved" in status.get("error", ""), status
