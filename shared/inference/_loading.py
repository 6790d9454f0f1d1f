"""Loading a fedlens model for use: its weights, classes, preprocessing and model card."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..checkpoint import load_checkpoint, resolve_model_path
from ..config import FedConfig
from ..errors import CheckpointError

if TYPE_CHECKING:
    from ..models import FedModel, ImageTransform
    from ..task import Task

__all__ = ["LoadedModel", "load_model", "model_card", "NOT_PRIVATE"]

_log = logging.getLogger(f"fedlens.{__name__}")

# What the card says for a site that trained without DP-SGD (or whose private rounds are unknown).
NOT_PRIVATE = "not private"


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint made ready to use.

    Attributes
    ----------
    task : Task
        The model under its run's config (backbone, policy, adapters), weights loaded,
        in eval mode; ``task.model`` is the network as trained.
    classes : tuple of str
        Class names, in the order of the model's outputs.
    meta : dict
        The checkpoint's header (``config``, ``classes``, ``round``, ...).
    card : dict
        The model card (:func:`model_card`).
    path : Path
        The model file that was read.
    """

    task: Task
    classes: tuple[str, ...]
    meta: dict[str, Any]
    card: dict[str, Any]
    path: Path

    @property
    def model(self) -> FedModel:
        return self.task.model

    @property
    def transform(self) -> ImageTransform:
        """The backbone's preprocessing at the run's ``image-size``: the one training used."""
        return self.task.transform


def load_model(path: str | Path, *, device: str = "cpu") -> LoadedModel:
    """Load a fedlens model from a file, a run folder or a site's state folder.

    Only safetensors are read (never pickles). The network is rebuilt from the config
    saved in the file, so the backbone, fine-tune policy and low-rank adapters are the
    ones it was trained with, and its preprocessing is the training preprocessing.

    Parameters
    ----------
    path : path-like
        ``model.safetensors``, a run folder (its ``model.safetensors``; its
        ``summary.json`` feeds the privacy part of the card), or a site's state folder
        (its ``global-model.safetensors``).
    device : str
        ``cpu``, ``cuda`` or ``auto``.

    Raises
    ------
    CheckpointError
        Not a fedlens safetensors model, or weights that do not fit the backbone and
        class count recorded in it.
    ConfigError
        For ``device = cuda`` without a visible GPU.
    """
    from ..task import Task

    file = resolve_model_path(path)
    ckpt = load_checkpoint(file)
    meta = ckpt.meta
    if "config" not in meta or "classes" not in meta:
        raise CheckpointError(f"{file} has no fedlens config/classes in its header; was it written by fedlens?")
    classes = tuple(str(c) for c in meta["classes"])
    cfg = FedConfig.from_mapping({**meta["config"], "device": device, "lora-rank": meta["config"].get("lora-rank", 0)})
    task = Task(cfg, len(classes))
    try:
        task.model.load_state_dict(ckpt.state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(
            f"{file} does not fit a {cfg.backbone} with {len(classes)} classes ({first}); the file was changed or comes from another model"
        ) from exc
    task.model.eval()
    _log.debug("loaded %s (%s, %d classes, round %s)", file, cfg.backbone, len(classes), meta.get("round"))
    return LoadedModel(task=task, classes=classes, meta=meta, card=model_card(file, meta), path=file)


def _run_summary(file: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((file.parent / "summary.json").read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}


def model_card(file: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """What a model is and how private its training was, from its header and its run's ``summary.json``.

    Parameters
    ----------
    file : path-like
        The model file; a ``summary.json`` in its folder (a run folder) supplies the
        sites and their privacy.
    meta : dict
        The checkpoint header.

    Returns
    -------
    dict
        ``classes``, ``backbone``, ``weights``, ``policy``, ``lora_rank``, ``rounds``,
        ``sites`` (how many), ``strategy``, ``dataset``, ``image_size``; ``private``
        (``True``, ``False`` or ``None`` when unknown), ``privacy_reason`` and
        ``site_privacy``: each site's ``{"epsilon", "delta"}`` or ``"not private"``.
    """
    from ..models import get_backbone

    file = Path(file)
    cfg = meta["config"]
    summary = _run_summary(file)
    privacy = summary.get("privacy") or {}
    card: dict[str, Any] = {
        "file": str(file),
        "classes": list(meta["classes"]),
        "backbone": cfg["backbone"],
        "weights": get_backbone(cfg["backbone"]).weights_source
        if cfg.get("pretrained", True)
        else "random initialisation (pretrained = false)",
        "policy": cfg["policy"],
        "lora_rank": cfg.get("lora-rank", 0),
        "rounds": meta.get("round"),
        "sites": summary.get("num_sites", cfg.get("num-sites")),
        "strategy": cfg["strategy"],
        "dataset": cfg["dataset"],
        "image_size": cfg["image-size"],
    }
    if privacy:
        card["private"] = bool(privacy.get("private"))
        card["privacy_reason"] = privacy.get("reason", "")
        dp_sites = privacy.get("sites") or {}
        every_site = sorted({*summary.get("sites", []), *dp_sites})
        card["site_privacy"] = {
            s: {"epsilon": dp_sites[s]["epsilon"], "delta": dp_sites[s]["delta"]} if s in dp_sites else NOT_PRIVATE for s in every_site
        }
    elif summary.get("mode") == "centralized":
        card["private"] = False
        card["privacy_reason"] = "centralized baseline: trained on pooled data without DP-SGD"
        card["site_privacy"] = {}
    else:
        card["private"] = None  # unknown: no run summary next to the model (e.g. a site's copy)
        card["privacy_reason"] = "unknown: no summary.json next to the model (only a run folder holds the privacy record)"
        card["site_privacy"] = {}
    return card
