"""Hot reload: a site's global model replaced under a running ``fedlens serve`` while a client keeps asking."""

from __future__ import annotations

import os
import threading

import httpx
import pytest

from fedlens.ops.procs import wait_for

from ..shared.inference_models import checkpoint, random_pictures
from .serving import serving


def _replace(target, data: bytes) -> None:
    """Write ``data`` the way a site does: a temporary file, fsync, rename over the old model."""
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)


class _Client(threading.Thread):
    """Asks for predictions in a loop; records every status and the versions that answered."""

    def __init__(self, url: str, image: bytes) -> None:
        super().__init__(daemon=True)
        self.url, self.image = url, image
        self.statuses: list[int] = []
        self.versions: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as c:
            while not self.stop.is_set():
                r = c.post("/predict", files={"file": ("a.png", self.image, "image/png")})
                self.statuses.append(r.status_code)
                if r.status_code == 200:
                    self.versions.append(r.json()["model"]["version"])


@pytest.mark.slow
def test_a_new_global_model_is_served_without_a_failed_request_and_garbage_is_refused(tmp_path):
    state = tmp_path / "site-state"
    state.mkdir()
    first = checkpoint(tmp_path / "first", str(tmp_path / "cache"), seed=0)
    second = checkpoint(tmp_path / "second", str(tmp_path / "cache"), seed=1)
    target = state / "global-model.safetensors"
    _replace(target, first.read_bytes())
    image = random_pictures(tmp_path / "pics", 1, seed=0)[0].read_bytes()

    with serving(state, tmp_path / "logs", "--watch-interval", "0.2") as server, server.client() as c:
        v1 = c.get("/v2/models/fedlens").json()["versions"][0]
        client = _Client(server.url, image)
        client.start()
        try:
            wait_for(lambda: len(client.statuses) >= 5, 60, "the client's first answers", interval=0.1)
            _replace(target, second.read_bytes())  # the next round's global model
            wait_for(lambda: c.get("/v2/models/fedlens").json()["versions"][0] != v1, 90, "the new version", interval=0.2)
            n = len(client.statuses)
            wait_for(lambda: len(client.statuses) >= n + 5, 60, "answers from the new model", interval=0.1)

            _replace(target, b"\x00garbage, not a model" * 100)
            wait_for(lambda: c.get("/v2/models/fedlens").json()["fedlens"]["last_reload_error"], 60, "the refusal", interval=0.2)
            n = len(client.statuses)
            wait_for(lambda: len(client.statuses) >= n + 5, 60, "answers after the refusal", interval=0.1)
        finally:
            client.stop.set()
            client.join(timeout=60)
        info = c.get("/v2/models/fedlens").json()
        metrics = c.get("/metrics").text

    v2 = info["versions"][0]
    assert set(client.statuses) == {200}, f"failed requests during the reloads: {sorted(set(client.statuses))}"
    assert v2 != v1 and client.versions[0] == v1 and client.versions[-1] == v2
    assert client.versions == sorted(client.versions, key=lambda v: v == v2), "once swapped, the old model never answers again"
    error = info["fedlens"]["last_reload_error"]
    assert info["fedlens"]["reloads"] == 1 and "not a safetensors model" in error["error"] and error["version"] != v2
    assert 'fedlens_serve_model_reloads_total{outcome="reloaded"} 1.0' in metrics
    assert 'fedlens_serve_model_reloads_total{outcome="failed"} 1.0' in metrics
    assert "fedlens_serve_model_reload_error 1.0" in metrics and f'version="{v2}"' in metrics
    log = server.log()
    assert f"-> {v2}" in log and "NOT loaded, still serving version " + v2 in log
