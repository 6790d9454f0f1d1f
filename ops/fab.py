"""The Flower app a run submits: a ``pyproject.toml`` naming the installed apps, no code.

``fedlens run`` does not ship the fedlens source tree. It writes a one-file app whose
components are the *installed* ``fedlens.server.app:app`` and ``fedlens.client.app:app``
and whose run-config table is generated from :class:`FedConfig`, so the same command
works from a source checkout and from an installed wheel, and the app (FAB) a site is
sent carries no Python code of its own.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from fedlens.shared.config import APP_KEYS, FedConfig

__all__ = ["SERVER_APP", "CLIENT_APP", "app_pyproject", "write_app"]

SERVER_APP = "fedlens.server.app:app"
CLIENT_APP = "fedlens.client.app:app"
# Defaults of the app-wiring keys (see fedlens.shared.config.APP_KEYS).
_APP_DEFAULTS = {"out-dir": "runs/flwr", "run-dir": ""}
assert set(_APP_DEFAULTS) == set(APP_KEYS)


def _fedlens_version() -> str:
    try:
        return version("fedlens")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def app_pyproject() -> str:
    """The app's ``pyproject.toml``: the components, and every config key with its default
    (Flower accepts ``--run-config`` overrides only for keys the app lists)."""
    values = {**_APP_DEFAULTS, **FedConfig().to_dict()}
    lines = [
        "[project]",
        'name = "fedlens"',
        f'version = "{_fedlens_version()}"',
        'description = "fedlens run: the installed fedlens apps"',
        'license = "Apache-2.0"',
        "",
        "[tool.flwr.app]",
        'publisher = "fedlens"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{SERVER_APP}"',
        f'clientapp = "{CLIENT_APP}"',
        "",
        "[tool.flwr.app.config]",
        *(f"{key} = {_toml(value)}" for key, value in values.items()),
    ]
    return "\n".join(lines) + "\n"


def write_app(folder: Path) -> Path:
    """Write the app into ``folder`` (created); returns it, ready for ``flwr run FOLDER``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(app_pyproject(), encoding="utf-8")
    return folder
