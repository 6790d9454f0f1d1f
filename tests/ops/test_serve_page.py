"""The page at ``/`` in a real browser: headless Chromium chooses an image and shows the answer and the overlay.

Chromium is driven over its DevTools protocol (a WebSocket, with the ``websockets``
package Flower's uvicorn already brings): the test sets the page's file input the way a
person choosing a file does, then reads what the page rendered.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from fedlens.ops.procs import free_port, wait_for

from ..shared.inference_models import CLASSES, checkpoint, random_pictures
from ..shared.test_report_browser import ARTIFACTS, _chromium
from .serving import serving


class _Page:
    """One browser tab over the DevTools protocol."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.next_id = 0

    def call(self, method: str, **params: object) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg["error"]
                return msg["result"]

    def js(self, expression: str) -> object:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")


def _tab(port: int) -> str:
    pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json() if t["type"] == "page"]
    return pages[0]["webSocketDebuggerUrl"]


@pytest.mark.slow
def test_the_page_classifies_a_chosen_image_and_shows_the_overlay(tmp_path):
    model = checkpoint(tmp_path / "run", str(tmp_path / "cache"))
    (image,) = random_pictures(tmp_path / "pics", 1, seed=4)
    debug_port = free_port()
    with serving(model, tmp_path / "logs") as server:
        browser = subprocess.Popen(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={debug_port}",
             f"--user-data-dir={tmp_path / 'profile'}", "--no-first-run", f"{server.url}/"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            wait_for(lambda: _debugger_up(debug_port), 60, "Chromium's DevTools endpoint", interval=0.3)
            with connect(_tab(debug_port), max_size=64 * 1024 * 1024) as ws:
                page = _Page(ws)
                wait_for(lambda: page.js("document.body && document.body.dataset.state") == "ready", 60, "the page's script", interval=0.2)
                page.js("document.getElementById('method').value = 'gradcam'")
                doc = page.call("DOM.getDocument")
                node = page.call("DOM.querySelector", nodeId=doc["root"]["nodeId"], selector="#file")["nodeId"]
                page.call("DOM.setFileInputFiles", nodeId=node, files=[str(Path(image).resolve())])
                wait_for(lambda: page.js("document.body.dataset.state") in ("done", "error"), 120, "the answer on the page", interval=0.2)
                status = page.js("document.getElementById('status').textContent")
                assert page.js("document.body.dataset.state") == "done", f"the page shows an error: {status}"
                labels = page.js("Array.from(document.querySelectorAll('#topk td.label')).map(td => td.textContent)")
                wait_for(lambda: page.js("document.getElementById('overlay').complete"), 10, "the overlay to load", interval=0.1)
                overlay = page.js("document.getElementById('overlay').naturalWidth")
                shot = page.call("Page.captureScreenshot", format="png")["data"]
        finally:
            browser.terminate()
            try:
                browser.wait(timeout=20)
            except subprocess.TimeoutExpired:
                browser.kill()
                browser.wait(timeout=10)

    assert labels and len(labels) == 3 and sorted(labels) == sorted(CLASSES), labels
    assert overlay == 32, "the Grad-CAM overlay (32 x 32 PNG) is shown"
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "serve-page-screenshot.png").write_bytes(base64.b64decode(shot))


def _debugger_up(port: int) -> bool:
    try:
        return any(t["type"] == "page" for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json())
    except (httpx.HTTPError, ValueError):
        time.sleep(0.1)
        return False
