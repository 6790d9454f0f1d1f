"""A federation on loopback: certificates, a TLS server with site authentication, sites."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedlens.ops.certs import add_site, init_ca
from fedlens.ops.procs import Procs, flower_env, free_port, listening, wait_for
from fedlens.shared.config import FedConfig
from fedlens.shared.data.samples import write_sample_folders

SITES = ["site-a", "site-b", "site-c"]

# Tiny work: 3 classes of 32 px images, 20 per class and site.
RUN = {
    "dataset": "folder",
    "image-size": 32,
    "batch-size": 16,
    # The default lr 0.5 is tuned for Poisson batches of 256: with batches of 16 each DP-SGD step
    # carries 16x the noise, and the model ends near chance (or diverges, and the run stops).
    "lr": 0.05,
    "test-fraction": 0.5,
    "num-rounds": 2,
    "min-sites": 2,
    "round-timeout": 90.0,
    "target-epsilon": 8.0,
}


@dataclass
class Federation:
    root: Path
    procs: Procs
    port: int
    certs: Path
    state: Path
    data: dict[str, Path]
    env: dict[str, str]
    cache_dir: str
    site_ports: dict[str, int] = field(default_factory=dict)
    # The SuperLink's own port on loopback (operator commands); kept across restarts.
    internal_port: int = field(default_factory=free_port)

    @property
    def address(self) -> str:
        """What sites dial: the front door."""
        return f"127.0.0.1:{self.port}"

    def fedlens(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a short ``fedlens`` command to completion."""
        return subprocess.run(
            [sys.executable, "-m", "fedlens.ops.cli", *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def start_server(self) -> None:
        self.procs.start(
            "server",
            "server",
            "start",
            "--certs",
            str(self.certs),
            "--state-dir",
            str(self.state),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--internal-port",
            str(self.internal_port),
        )
        wait_for(lambda: listening(self.port), 120, "the server to listen")

    def register(self, site: str) -> None:
        r = self.fedlens("server", "add-site", site, str(self.certs / "sites" / f"{site}.pub"), "--state-dir", str(self.state))
        assert r.returncode == 0, r.stderr

    def start_site(self, site: str, *extra: str) -> None:
        port = self.site_ports.setdefault(site, free_port())
        self.procs.start(
            site,
            "client",
            "start",
            "--server",
            self.address,
            "--ca",
            str(self.certs / "ca.pem"),
            "--key",
            str(self.certs / "sites" / f"{site}.key"),
            "--data",
            str(self.data[site]),
            "--state-dir",
            str(self.root / "state" / site),
            "--max-epsilon",
            "50",
            "--allow-evaluation",
            "--port",
            str(port),
            *extra,
        )

    def online(self) -> set[str]:
        r = self.fedlens("server", "sites", "--state-dir", str(self.state), "--json")
        if r.returncode != 0:
            return set()
        return {name for name, info in json.loads(r.stdout).items() if info["status"] == "online"}

    def run_config(self, **extra: object) -> Path:
        cfg = FedConfig.from_mapping({**RUN, "data-path": str(self.data["server"]), "cache-dir": self.cache_dir, **extra})
        path = self.root / "run.toml"
        path.write_text(cfg.to_toml())
        return path

    def start_run(self, out: Path, **extra: object) -> subprocess.Popen[bytes]:
        return self.procs.start(
            "run",
            "run",
            "--state-dir",
            str(self.state),
            "--config",
            str(self.run_config(**extra)),
            "--out",
            str(out),
        )


@pytest.fixture(scope="session")
def deploy_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_sample_folders(tmp_path_factory.mktemp("deploy-images"), ["server", *SITES])


@pytest.fixture
def federation(tmp_path: Path, deploy_images: dict[str, Path], cache_dir: str) -> Federation:
    """Certificates, three registered site keys and a running TLS server (sites not started)."""
    certs = tmp_path / "certs"
    init_ca(certs, ["127.0.0.1"])
    for site in [*SITES, "rogue"]:
        add_site(certs, site)
    env = flower_env(FLWR_HOME=str(tmp_path / "flwr-home"))
    procs = Procs(tmp_path / "logs", env)
    fed = Federation(tmp_path, procs, free_port(), certs, tmp_path / "server-state", deploy_images, env, cache_dir)
    try:
        fed.start_server()
        for site in SITES:
            fed.register(site)
        yield fed
    finally:
        procs.stop_all()
