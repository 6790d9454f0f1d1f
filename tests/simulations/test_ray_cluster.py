"""`fedlens simulate` on a real two-node Ray cluster: a head and a worker, each a `ray start` process.

Both nodes run on this machine (loopback), each with its own raylet and one CPU,
under a private Ray temp folder so that no other Ray user on the machine can
attach to them by accident. Ray 2.55's GCS and raylets listen on every interface even
with ``--node-ip-address 127.0.0.1``; the test cluster lives only as long as the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fedlens.ops.procs import flower_env, free_port, listening, wait_for

pytestmark = pytest.mark.slow

_QUERY = """
import json, sys
import ray
from ray._private import state
ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False)
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
actors = [
    {"class": a.get("ActorClassName") or a.get("ClassName"), "node": a["Address"]["NodeID"]}
    for a in state.actors().values()
]
print(json.dumps({"nodes": nodes, "actors": actors}))
"""


def _ray(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "ray"), *args]


def _query(address: str, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _QUERY, address], env=env, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def two_node_cluster(tmp_path):
    """A head and a worker node (1 CPU each) on loopback; yields the head's address."""
    temp = tempfile.mkdtemp(prefix="flray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = flower_env(RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ("--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--temp-dir={temp}")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(tmp_path / "head.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    _ray(
                        "start", "--head", f"--port={port}", "--include-dashboard=false", f"--ray-client-server-port={free_port()}", *common
                    ),
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: stopped below by its PID
                )
            )
        wait_for(lambda: listening(port), 90, "the Ray head's GCS port")
        with open(tmp_path / "worker.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    _ray("start", f"--address={address}", *common),
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        wait_for(lambda: len(_query(address, env)["nodes"]) == 2, 120, "both Ray nodes alive", interval=3)
        yield address, env
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)  # the group we created: `ray start`, its raylet and workers
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


def test_simulate_attaches_to_a_two_node_cluster_and_sites_run_on_both(tmp_path, cache_dir, two_node_cluster):
    address, env = two_node_cluster
    out = tmp_path / "run"
    settings = {
        "ray-address": address,
        "num-sites": 4,
        "num-rounds": 2,
        "max-train-images": 400,
        "max-test-images": 200,
        "image-size": 32,
        "partition": "iid",
        "batch-size": 16,
        "lr": 0.05,  # the default 0.5 is tuned for batches of 256
        "report-per-class": 0,
        "cache-dir": cache_dir,
    }
    args = [a for key, value in settings.items() for a in ("--set", f"{key}={json.dumps(value) if isinstance(value, str) else value}")]
    done = subprocess.run(
        [str(Path(sys.executable).parent / "fedlens"), "simulate", "--out", str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "attached to the Ray cluster at " + address in done.stderr
    assert "2 nodes" in done.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(set(r["sites_train"]) == {f"site-{i}" for i in range(4)} for r in records)

    seen = _query(address, env)
    site_nodes = {a["node"] for a in seen["actors"] if a["class"] == "ClientAppActor"}
    assert site_nodes == set(seen["nodes"]), f"sites ran on {len(site_nodes)} of the cluster's {len(seen['nodes'])} nodes"


def test_a_wrong_cluster_address_fails_before_the_run_with_directions(tmp_path, cache_dir):
    port = free_port()  # nothing listens there
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "fedlens"),
            "simulate",
            "--out",
            str(tmp_path / "run"),
            "--set",
            f'ray-address="127.0.0.1:{port}"',
            "--set",
            "max-train-images=200",
            "--set",
            "image-size=32",
            "--set",
            f'cache-dir="{cache_dir}"',
        ],
        env=flower_env(RAY_USAGE_STATS_ENABLED="0"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert f"cannot attach to the Ray cluster at '127.0.0.1:{port}'" in done.stderr
    assert "ray start --head" in done.stderr
