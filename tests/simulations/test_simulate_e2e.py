"""End-to-end: real Flower simulation engine (Ray), real pretrained backbone, tiny data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fedlens.shared.checkpoint import load_checkpoint
from fedlens.shared.config import FedConfig
from fedlens.simulations.runner import SimulationFailed, centralized, simulate

pytestmark = pytest.mark.slow

TINY = {
    "num-sites": 2,
    "num-rounds": 1,
    "max-train-images": 300,
    "max-test-images": 200,
    "image-size": 32,
    "partition": "iid",
    "batch-size": 16,
    # The default lr 0.5 is tuned for Poisson batches of 256: with batches of 16 each DP-SGD step
    # carries 16x the noise, and the model ends near chance (or diverges, and the run stops).
    "lr": 0.05,
    "report-per-class": 0,
}


def _cfg(cache_dir: str, **extra) -> FedConfig:
    return FedConfig.from_mapping({**TINY, "cache-dir": cache_dir, **extra})


def test_two_sites_one_round_writes_every_artifact(tmp_path, cache_dir):
    out = tmp_path / "run"
    summary = simulate(_cfg(cache_dir, **{"report-per-class": 1}), out)
    for name in (
        "config.toml",
        "metrics.jsonl",
        "summary.json",
        "model.safetensors",
        "partitions.json",
        "accuracy.png",
        "loss.png",
        "report/report.html",
        "report/report.json",
    ):
        assert (out / name).is_file(), name
    for key in ("final_accuracy", "final_macro_f1", "rounds", "num_sites", "wall_seconds", "bytes_per_site_round", "full_model_bytes"):
        assert key in summary, key
    assert summary["rounds"] == 1 and summary["num_sites"] == 2
    assert 0 < summary["bytes_per_site_round"] < summary["full_model_bytes"]
    assert 0.0 <= summary["final_accuracy"] <= 1.0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    assert len(lines) == 1 and record["round"] == 1
    assert set(record["sites_train"]) == {"site-0", "site-1"}
    assert len(record["server"]["confusion"]) == 10
    ckpt = load_checkpoint(out / "model.safetensors")
    assert ckpt.meta["round"] == 1 and ckpt.meta["config"]["num-sites"] == 2
    counts = json.loads((out / "partitions.json").read_text())["class_counts"]
    assert sum(map(sum, counts.values())) == 300


def test_a_folder_simulation_takes_the_classes_and_a_class_map(tmp_path, cache_dir, image_folder):
    # image_folder holds alpha, beta, gamma; the run names four classes in its own order and calls beta "b".
    cmap = tmp_path / "map.toml"
    cmap.write_text('beta = "b"\n')
    extra = {"dataset": "folder", "data-path": str(image_folder), "batch-size": 4, "test-fraction": 0.25}
    cfg = _cfg(cache_dir, **extra, **{"classes": "gamma, Alpha, b, delta", "class-map": str(cmap)})
    out = tmp_path / "run"
    summary = simulate(cfg, out)
    assert summary["rounds"] == 1
    assert load_checkpoint(out / "model.safetensors").meta["classes"] == ["gamma", "Alpha", "b", "delta"]
    assert json.loads((out / "partitions.json").read_text())["classes"] == ["gamma", "Alpha", "b", "delta"]
    record = json.loads((out / "metrics.jsonl").read_text())
    assert len(record["server"]["confusion"]) == 4 and set(record["sites_train"]) == {"site-0", "site-1"}


def test_a_failing_site_does_not_stop_the_run(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("FEDLENS_INJECT_FAULT", "site-1")
    summary = simulate(_cfg(cache_dir, **{"min-sites": 1}), tmp_path / "run")
    assert summary["rounds"] == 1
    assert "site-1" in summary["site_failures"]
    assert "injected fault" in summary["site_failures"]["site-1"][0]


def test_every_site_failing_stops_the_run_with_the_reason(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("FEDLENS_INJECT_FAULT", "site-0,site-1")
    with pytest.raises(SimulationFailed, match="none of the 2 sampled sites"):
        simulate(_cfg(cache_dir), tmp_path / "run")
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and "injected fault" in status["reason"]


def test_the_published_model_is_the_average_of_the_rounds(tmp_path, cache_dir):
    out = tmp_path / "run"
    summary = simulate(_cfg(cache_dir, **{"num-rounds": 2, "ema-decay": 0.5}), out)
    first, second = (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    assert first["server"]["accuracy"] == first["server_unaveraged"]["accuracy"]  # the first model starts the average
    assert summary["ema_decay"] == 0.5 and summary["final_accuracy_unaveraged"] == second["server_unaveraged"]["accuracy"]
    ckpt = load_checkpoint(out / "model.safetensors")
    aggregate = ckpt.training_state
    assert aggregate, "an averaged run must save the plain aggregate to resume from"
    # model = 0.5 * aggregate(1) + 0.5 * aggregate(2): the average differs from the last aggregate.
    assert any(not torch.allclose(ckpt.state[k], v) for k, v in aggregate.items())


def test_centralized_baseline(tmp_path, cache_dir):
    # Centralized training never runs DP-SGD: with the DP-tuned lr it diverges (and stops), so use the non-private settings.
    summary = centralized(_cfg(cache_dir, **{"num-rounds": 2, "dp": False}), tmp_path / "central")
    assert summary["mode"] == "centralized" and summary["rounds"] == 2
    assert len((tmp_path / "central" / "metrics.jsonl").read_text().splitlines()) == 2


def test_centralized_takes_the_local_steps_of_the_runs_sites(tmp_path, cache_dir):
    def steps(name: str, **extra) -> list[int]:
        centralized(_cfg(cache_dir, **{"local-steps": 25, **extra}), tmp_path / name)
        return [json.loads(line)["train"]["train-steps"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert steps("public", dp=False) == [25]  # 300 images, batch 16: a pass is 19 steps; the floor adds 6
    assert steps("private") == [19]  # private sites take the steps DP-SGD accounts for, and so does their baseline


def _fedlens(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fedlens.ops.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so the kill reaches Ray's children too
        **kw,
    )


def test_killed_run_resumes_from_its_last_completed_round(tmp_path, cache_dir):
    out = tmp_path / "run"
    # With a model average, so that resuming must restore both the average and the plain aggregate.
    sets = [f"--set={k}={v}" for k, v in {**TINY, "num-rounds": 3, "ema-decay": 0.5, "cache-dir": f'"{cache_dir}"'}.items()]
    proc = _fedlens("simulate", "--out", str(out), *sets)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 1:
                if (out / "model.safetensors").is_file():
                    break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be interrupted:\n" + (proc.stdout.read() if proc.stdout else "")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    done = load_checkpoint(out / "model.safetensors").meta["round"]
    assert 1 <= done < 3
    resumed = _fedlens("simulate", "--resume", str(out))
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    rounds = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 3
    assert f"resuming after round {done}" in output
    final = load_checkpoint(out / "model.safetensors")
    assert final.training_state is not None and set(final.training_state) <= set(final.state)
    assert all("server_unaveraged" in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    # The sites' privacy ledgers survived the kill: same run, history carried, nothing reset.
    from fedlens.shared.privacy import PrivacyLedger

    run_id = (out / "run-id").read_text().strip()
    for site in ("site-0", "site-1"):
        entries = PrivacyLedger(out / "sites" / site).entries()
        assert {e.run_id for e in entries} == {run_id}
        assert {1, 2, 3} <= {e.round for e in entries}  # a round re-run after the kill is recorded again
        assert len({e.noise_multiplier for e in entries}) == 1  # calibrated once for the run
        assert [e.epsilon for e in entries] == sorted(e.epsilon for e in entries)
        assert summary["privacy"]["sites"][site]["epsilon"] == entries[-1].epsilon


def test_cli_reports_bad_config_without_starting(tmp_path):
    proc = _fedlens("simulate", "--out", str(tmp_path / "x"), "--set", "alpha=-1")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "alpha" in output and not (tmp_path / "x").exists()


def test_privacy_show_prints_the_ledger(tmp_path):
    from fedlens.shared.privacy import PrivacyLedger

    PrivacyLedger(tmp_path).record(
        run_id="run-7", round=1, noise_multiplier=1.2, sample_rate=0.02, steps=50, delta=1e-5, accountant="rdp", epsilon=0.5
    )
    proc = _fedlens("privacy", "show", str(tmp_path), "--json")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    entries = json.loads(output)["entries"]
    assert entries[0]["run_id"] == "run-7" and entries[0]["epsilon"] > 0
    missing = _fedlens("privacy", "show", str(tmp_path / "nope"))
    output, _ = missing.communicate(timeout=120)
    assert missing.returncode == 2 and "no privacy ledger" in output


@pytest.mark.parametrize("command", [[], ["simulate"], ["centralized"], ["config"], ["privacy", "show"], ["data", "check"]])
def test_every_command_has_help(command):
    proc = _fedlens(*command, "--help")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "usage: fedlens" in output


def test_invalid_partition_fails_before_creating_the_run_folder(tmp_path, cache_dir):
    from fedlens.shared.errors import ConfigError

    cfg = _cfg(cache_dir, **{"max-train-images": 30, "num-sites": 20, "min-sites": 2})
    with pytest.raises(ConfigError, match="at least 40 training images"):
        simulate(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
