"""The SuperNode `fedlens client start` runs gets fedlens' shorter waits, in its own process."""

from __future__ import annotations

import os
import signal
import subprocess
import threading

from fedlens.ops.procs import flower_env, free_port
from fedlens.ops.supernode import SECRET_FILE, SiteSettings, supernode_command
from fedlens.server.flower_waits import IDLE_POLL_S, MESSAGE_POLL_S


def test_the_site_supernode_runs_with_the_shorter_waits(tmp_path):
    site = SiteSettings(server=f"127.0.0.1:{free_port()}", data=tmp_path, state_dir=tmp_path, name="clinic", port=free_port())
    (tmp_path / SECRET_FILE).write_text("0" * 64)
    cmd = supernode_command(site)
    assert cmd[1:3] == ["-m", "fedlens.ops.flower_supernode"]
    proc = subprocess.Popen(cmd, env=flower_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "Starting Flower SuperNode" in line:  # Flower's own main is running
                started.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert started.wait(120), "".join(lines)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    text = "".join(lines)
    assert f"SuperNode waits: asks for messages every {MESSAGE_POLL_S:.1f} s while at work" in text, text
    assert f"every {IDLE_POLL_S:.1f} s when idle" in text, text
    assert "SuperNode retries: a request the server answers with an internal error (500)" in text, text
    assert "left at Flower's own" not in text
