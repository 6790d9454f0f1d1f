"""The last update a site sent, kept so that a re-asked round costs no new privacy.

When a server restarts mid-round it asks again for the round it lost. Training
again would spend epsilon the run did not plan for; re-sending the update already
computed from the *same* global model is post-processing of an output that was
already paid for, so it is free. The outbox holds that one update, keyed by run,
round and a digest of the model it was trained from, written atomically after the
ledger entry and before the reply.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from ..errors import CheckpointError

__all__ = ["UpdateOutbox", "state_digest"]

_log = logging.getLogger("fedlens.privacy.outbox")

OUTBOX_FILE = "last-update.safetensors"


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of a state dict."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu")
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        flat = t.clone(memory_format=torch.contiguous_format).reshape(-1)  # channels-last safe
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


class UpdateOutbox:
    """``state_dir/last-update.safetensors``."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / OUTBOX_FILE

    def put(
        self, *, run_id: str, round: int, digest: str, state: dict[str, torch.Tensor], num_examples: int, metrics: dict[str, float]
    ) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.path, state, run_id=run_id, round=round, digest=digest, num_examples=num_examples, metrics=metrics)

    def get(self, *, run_id: str, round: int, digest: str) -> tuple[dict[str, torch.Tensor], int, dict[str, float]] | None:
        """The stored update if it answers exactly this request, else None."""
        if not self.path.is_file():
            return None
        try:
            ckpt = load_checkpoint(self.path)
        except CheckpointError as exc:  # a damaged cache only costs a retrain
            _log.warning("ignoring unreadable %s (%s)", self.path, exc)
            return None
        meta = ckpt.meta
        if meta.get("run_id") != run_id or meta.get("round") != round or meta.get("digest") != digest:
            return None
        return ckpt.state, int(meta["num_examples"]), {k: float(v) for k, v in meta["metrics"].items()}
