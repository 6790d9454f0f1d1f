"""A run's folder: resolved config, per-round metrics, checkpoint, summary and plots.

Commit order per round: the metrics line is appended first, then the checkpoint is
replaced atomically. The checkpoint's ``round`` is therefore the authority on what
completed; on resume, metric lines past it are dropped.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

import torch

from .checkpoint import MODEL_FILE, read_checkpoint_meta, save_checkpoint
from .config import FedConfig, load_config
from .errors import ConfigError
from .io import append_jsonl, atomic_write_json, atomic_write_text

__all__ = ["RunDir"]

_log = logging.getLogger(f"fedlens.{__name__}")

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
STATUS_FILE = "status.json"
RUN_ID_FILE = "run-id"
SITES_DIR = "sites"


class RunDir:
    """Reads and writes one run's artifacts under ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # ---- creation and resume -----------------------------------------------
    @classmethod
    def create(cls, path: str | Path, cfg: FedConfig) -> RunDir:
        """Start a new run in ``path`` (which must not already hold one).

        Raises
        ------
        ConfigError
            If ``path`` already holds a run: resume it or choose another folder.
        """
        run = cls(path)
        if (run.path / CONFIG_FILE).exists():
            raise ConfigError(f"{run.path} already holds a run; continue it with `--resume {run.path}` or pass another `--out`")
        run.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.path / CONFIG_FILE, cfg.to_toml())
        atomic_write_text(run.path / RUN_ID_FILE, uuid.uuid4().hex + "\n")
        run.set_status("running")
        return run

    @property
    def run_id(self) -> str:
        """The run's identity: sites key their privacy ledgers by it, also across resumes."""
        path = self.path / RUN_ID_FILE
        if not path.is_file():
            atomic_write_text(path, uuid.uuid4().hex + "\n")
        return path.read_text(encoding="utf-8").strip()

    def config(self) -> FedConfig:
        """The run's resolved configuration."""
        path = self.path / CONFIG_FILE
        if not path.is_file():
            raise ConfigError(f"{self.path} is not a fedlens run folder (no {CONFIG_FILE})")
        return load_config(path)

    def completed_rounds(self) -> int:
        """Rounds whose global model is safely on disk (0 when none)."""
        if not (self.path / MODEL_FILE).is_file():
            return 0
        return int(read_checkpoint_meta(self.path / MODEL_FILE).get("round", 0))

    def prepare_resume(self) -> int:
        """Drop metric lines past the last checkpoint; return the completed rounds."""
        done = self.completed_rounds()
        kept = [r for r in self.records() if r["round"] <= done]
        atomic_write_text(self.path / METRICS_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        self.set_status("running", resumed_after_round=done)
        return done

    # ---- per round -------------------------------------------------------------
    def record_round(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path / METRICS_FILE, record)

    def records(self) -> list[dict[str, Any]]:
        """Every complete metrics line, in order (a torn last line is skipped)."""
        path = self.path / METRICS_FILE
        if not path.is_file():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                _log.warning("%s: skipping a torn metrics line", path)
        return out

    def save_model(
        self,
        state: dict[str, torch.Tensor],
        *,
        cfg: FedConfig,
        classes: tuple[str, ...],
        round: int,
        training_state: dict[str, torch.Tensor] | None = None,
        **meta: Any,
    ) -> None:
        save_checkpoint(
            self.path / MODEL_FILE, state, training_state=training_state, config=cfg.to_dict(), classes=list(classes), round=round, **meta
        )

    # ---- other artifacts --------------------------------------------------------
    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_json(self.path / name, obj)

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text(encoding="utf-8"))

    def set_status(self, status: str, **extra: Any) -> None:
        self.write_json(STATUS_FILE, {"status": status, **extra})

    def status(self) -> dict[str, Any]:
        path = self.path / STATUS_FILE
        return self.read_json(STATUS_FILE) if path.is_file() else {"status": "unknown"}

    def finish(self, summary: dict[str, Any], *, stopped_early: str | None = None, failed: str | None = None) -> None:
        """Write ``summary.json`` and the plots, and mark the run finished (maybe early, with the reason) or failed."""
        from .plots import plot_rounds

        records = self.records()
        if records:
            plot_rounds(records, self.path)
        self.write_json(SUMMARY_FILE, summary)
        if failed:
            self.set_status("failed", reason=failed)
        else:
            self.set_status("finished", **({"stopped_early": stopped_early} if stopped_early else {}))
