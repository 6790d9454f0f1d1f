"""How fedlens starts Flower's SuperLink and SuperNode: secure unless told otherwise."""

from __future__ import annotations

import pytest

from fedlens.ops.certs import add_site, init_ca
from fedlens.ops.control import ControlError
from fedlens.ops.superlink import ServerSettings, superlink_command
from fedlens.ops.superlink import add_site as register_site
from fedlens.ops.supernode import ConnectError, SiteSettings, check_site, node_config, supernode_command


def test_server_is_tls_with_site_auth_and_no_runtime_installs_by_default(tmp_path):
    init_ca(tmp_path / "c", ["localhost"])
    cmd = superlink_command(ServerSettings(state_dir=tmp_path / "s", certs=tmp_path / "c"))
    for flag in (
        "--ssl-ca-certfile",
        "--ssl-certfile",
        "--ssl-keyfile",
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database",
    ):
        assert flag in cmd, flag
    assert "--insecure" not in cmd
    insecure = superlink_command(ServerSettings(state_dir=tmp_path / "s", certs=None, insecure=True))
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure


def test_site_settings_travel_as_node_config_the_server_cannot_override(tmp_path):
    s = SiteSettings(
        server="h:1",
        data=tmp_path / "d",
        state_dir=tmp_path / "st",
        name='we"ird',
        ca=tmp_path / "ca.pem",
        key=tmp_path / "k",
        max_epsilon=3.0,
        delta=1e-6,
        device="cpu",
    )
    text = node_config(s)
    assert 'site-name="we\\"ird"' in text and "max-epsilon=3.0" in text and "delta=1e-06" in text
    assert "allow-evaluation=false" in text and "allow-non-private=false" in text and 'device="cpu"' in text
    assert "max-image-pixels=100000000" in text  # an integer, not a string: the site's config reads it as one
    cmd = supernode_command(s)
    assert "--auth-supernode-private-key" in cmd and "--root-certificates" in cmd and "--insecure" not in cmd


def test_site_checks_its_own_side_first(tmp_path, image_folder):
    init_ca(tmp_path / "c", ["localhost"])
    key, _pub = add_site(tmp_path / "c", "clinic")
    ok = SiteSettings(server="h:1", data=image_folder, state_dir=tmp_path / "st", name="clinic", ca=tmp_path / "c" / "ca.pem", key=key)
    assert check_site(ok) == 36
    key.chmod(0o644)
    with pytest.raises(ConnectError, match="chmod 600"):
        check_site(ok)
    key.chmod(0o600)
    with pytest.raises(ConnectError, match="not found"):
        check_site(SiteSettings(**{**ok.__dict__, "key": tmp_path / "missing.key"}))
    with pytest.raises(ConnectError, match="max-epsilon"):
        check_site(SiteSettings(**{**ok.__dict__, "max_epsilon": 0.0}))


def test_the_site_check_writes_its_data_check_and_refuses_what_no_label_set_fixes(tmp_path, image_folder):
    import json

    import torch

    from fedlens.shared.checkpoint import save_checkpoint
    from fedlens.shared.data import LabelMismatch

    state = tmp_path / "st"
    ok = SiteSettings(server="h:1", data=image_folder, state_dir=state, name="clinic", ca=None, key=None)
    assert check_site(ok) == 36
    report = json.loads((state / "data-check.json").read_text())
    assert report["classes_from"] is None and report["per_class"] == {"alpha": 12, "beta": 12, "gamma": 12}

    # Against the classes of the global model the site kept from its last run: reported, not refused.
    save_checkpoint(state / "global-model.safetensors", {"w": torch.zeros(1)}, config={}, classes=["alpha", "beta"], round=1)
    assert check_site(ok) == 36
    report = json.loads((state / "data-check.json").read_text())
    assert report["unknown"] == ["gamma"] and "'gamma'" in report["problems"][0]

    (state / "global-model.safetensors").unlink()
    (image_folder / "Alpha").mkdir()  # two folders for one class, whatever the federation's classes
    with pytest.raises(LabelMismatch, match="'Alpha', 'alpha'"):
        check_site(ok)
    cmap = tmp_path / "map.toml"
    cmap.write_text('Alpha = "alpha"\nalpha = "alpha"\n')
    assert check_site(SiteSettings(**{**ok.__dict__, "class_map": cmap})) == 36


def test_registering_a_private_key_is_refused(tmp_path):
    init_ca(tmp_path / "c", ["localhost"])
    key, _pub = add_site(tmp_path / "c", "clinic")
    with pytest.raises(ControlError, match="never the private key"):
        register_site(tmp_path / "state", "clinic", key)


def test_a_run_folder_is_held_by_one_server_app_at_a_time(tmp_path):
    from fedlens.server.app import _claim
    from fedlens.shared.config import FedConfig
    from fedlens.shared.errors import ConfigError
    from fedlens.shared.rundir import RunDir

    run = RunDir.create(tmp_path / "run", FedConfig())
    with _claim(run):
        with pytest.raises(ConfigError, match="another server app"):
            with _claim(RunDir(tmp_path / "run")):
                pass
    with _claim(run):  # released when the first one ends
        pass


def _start(tmp_path, *extra: str):  # type: ignore[no-untyped-def]
    """`fedlens server start` with TLS on free ports; returns (procs, state dir, public port, server.json)."""
    import json

    from fedlens.ops.procs import Procs, flower_env, free_port, listening, wait_for

    init_ca(tmp_path / "certs", ["127.0.0.1"])
    procs = Procs(tmp_path / "logs", flower_env(FLWR_HOME=str(tmp_path / "home")))
    state, port, internal = tmp_path / "state", free_port(), free_port()
    procs.start(
        "server",
        "server",
        "start",
        "--certs",
        str(tmp_path / "certs"),
        "--state-dir",
        str(state),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--internal-port",
        str(internal),
        *extra,
    )
    wait_for(lambda: listening(port) and "frontdoor_pid" in (state / "server.json").read_text(), 120, "the server")
    info = json.loads((state / "server.json").read_text())
    assert info["address"] == f"127.0.0.1:{internal}" and info["public_address"] == f"127.0.0.1:{port}"
    return procs, state, port, info


def _gone(pid: int) -> bool:
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.deployment
def test_the_server_is_a_loopback_superlink_behind_a_front_door_and_sigterm_stops_both(tmp_path):
    import signal

    from fedlens.ops.control import Connection
    from fedlens.ops.procs import tree
    from fedlens.ops.superlink import server_connection

    procs, state, port, info = _start(tmp_path)
    try:
        server = procs.procs["server"]
        pids = tree(server.pid)
        assert {info["superlink_pid"], info["frontdoor_pid"]} <= set(pids)
        assert server_connection(state).flwr("ls")["success"]  # the operator's way in: loopback
        with pytest.raises(ControlError, match="--state-dir"):  # not through the sites' port
            Connection(f"127.0.0.1:{port}", tmp_path / "certs" / "ca.pem").flwr("ls")
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        assert all(_gone(pid) for pid in pids), [p for p in pids if not _gone(p)]
    finally:
        procs.stop_all()


@pytest.mark.deployment
def test_a_crashed_superlink_stops_the_server_with_a_non_zero_exit_saying_so(tmp_path):
    import os
    import signal

    procs, _state, _port, info = _start(tmp_path)
    try:
        os.kill(info["superlink_pid"], signal.SIGKILL)
        assert procs.procs["server"].wait(timeout=60) == 1
        log = procs.log("server")
        assert f"the SuperLink (pid {info['superlink_pid']}) was killed by SIGKILL" in log
        assert "its last lines" in log and "stopped the server's other processes" in log
        assert _gone(info["frontdoor_pid"])
    finally:
        procs.stop_all()


def test_start_refuses_an_internal_port_equal_to_the_public_one(tmp_path):
    from fedlens.ops.superlink import start_server

    init_ca(tmp_path / "c", ["127.0.0.1"])
    with pytest.raises(ControlError, match="--internal-port"):
        start_server(ServerSettings(state_dir=tmp_path / "s", certs=tmp_path / "c", host="127.0.0.1", port=9999, internal_port=9999))


def test_superlink_listens_on_loopback_only(tmp_path):
    init_ca(tmp_path / "c", ["localhost"])
    cmd = superlink_command(ServerSettings(state_dir=tmp_path / "s", certs=tmp_path / "c", host="0.0.0.0", port=9092, internal_port=9193))
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "9193"
