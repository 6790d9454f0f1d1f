"""The report opens in a real browser (headless Chromium): every image loads, no script error."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fedlens.shared.explain import ExplainOptions, explain

from .test_explain import model_file  # noqa: F401  (fixture)

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("no headless Chromium found: `bash .ci/setup` installs Debian's chromium package (as root)")


def _run(*args: str) -> str:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=10000", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_report_renders_in_headless_chromium(model_file, image_folder, tmp_path):  # noqa: F811
    out = tmp_path / "report"
    explain(model_file, str(image_folder), out, ExplainOptions(per_class=2, sanity_images=4))
    url = (out / "report.html").resolve().as_uri()
    dom = _run("--dump-dom", url)
    body = re.search(r"<body[^>]*>", dom)
    assert body, dom[:500]
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', body.group(0))
    errors = re.search(r'data-errors="(\d+)"', body.group(0))
    assert loaded and errors, f"the report's load check did not run: {body.group(0)}"
    ok, total = map(int, loaded.groups())
    assert total == 6 * 5 + 3 and ok == total, f"{total - ok} of {total} images failed to load"
    assert errors.group(1) == "0", "script errors in the report"
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report-screenshot.png"
    _run("--window-size=1200,3000", f"--screenshot={shot}", url)
    assert shot.stat().st_size > 10_000
