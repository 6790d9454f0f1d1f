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
