"""Build an explainability report of a fedlens model on a set of labelled images.

Everything runs where the images are (a site, the server, or the end of a
simulation); only the report leaves, and only if its owner sends it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import load_checkpoint
from ..config import FedConfig
from ..data import ImageSet, load_dataset, load_image_folder
from ..errors import CheckpointError, DataError
from ..io import atomic_write_json, atomic_write_text
from ..metrics import classification_report, roc_curve
from .methods import MethodOptions, attribute, get_method
from .trust import SANITY_FLAG, deletion_insertion, random_ranking_maps, randomized_copy, rank_correlation

__all__ = ["ExplainOptions", "explain", "load_model"]

_log = logging.getLogger("fedlens.explain")

DEFAULT_METHODS = ("integrated-gradients", "grad-cam", "occlusion", "saliency")


@dataclass(frozen=True)
class ExplainOptions:
    methods: tuple[str, ...] = DEFAULT_METHODS
    per_class: int = 10  # images shown (and explained) per class
    smoothgrad: int = 0  # SmoothGrad samples for Integrated Gradients (0 = off)
    sanity_images: int = 16  # images used for the model-randomisation check
    internal_batch_size: int = 32
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def load_model(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """A :class:`~shared.task.Task` holding the checkpoint's model, and the checkpoint metadata.

    ``path`` is a ``model.safetensors`` file or a run folder. Only safetensors are read.

    Raises
    ------
    CheckpointError
        Not a fedlens safetensors model, or weights that do not fit the backbone and
        class count recorded in it.
    """
    from ..task import Task

    ckpt = load_checkpoint(path)
    meta = ckpt.meta
    if "config" not in meta or "classes" not in meta:
        raise CheckpointError(f"{path} has no fedlens config/classes in its header; was it written by fedlens?")
    cfg = FedConfig.from_mapping({**meta["config"], "device": "cpu", "lora-rank": meta["config"].get("lora-rank", 0)})
    task = Task(cfg, len(meta["classes"]))
    try:
        task.model.load_state_dict(ckpt.state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(
            f"{path} does not fit a {cfg.backbone} with {len(meta['classes'])} classes ({first}); "
            "the file was changed or comes from another model"
        ) from exc
    task.model.eval()
    return task, meta


def _load_images(data: str | ImageSet, cfg: FedConfig, classes: list[str]) -> ImageSet:
    if isinstance(data, ImageSet):
        images = data
    elif data == "fashion-mnist":
        _train, test = load_dataset(FedConfig.from_mapping({"dataset": "fashion-mnist", "data-path": ""}, base=cfg))
        images = test
    else:
        images, report = load_image_folder(data, image_size=cfg.image_size)
        if report.skipped:
            _log.warning("%s", report.summary())
    if list(images.classes) != list(classes):
        raise DataError(
            f"the classes in {data if isinstance(data, str) else images.name} ({', '.join(images.classes)}) are not the model's ({', '.join(classes)}); "
            "use a folder with one sub-folder per model class, named the same"
        )
    counts = np.bincount(images.labels.numpy(), minlength=len(classes))
    empty = [c for c, k in zip(classes, counts) if k == 0]
    if empty:
        _log.warning("class(es) %s have no images in %s: no metrics or examples for them in the report", ", ".join(empty), images.name)
    return images


def _pick(labels: np.ndarray, preds: np.ndarray, per_class: int, seed: int) -> list[int]:
    """Per class, up to ``per_class`` images: misclassified ones first (up to half, more
    when there are too few correct ones), then correct ones."""
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        wrong = [i for i in idx if preds[i] != c]
        right = [i for i in idx if preds[i] == c]
        take_right = right[: per_class - min(len(wrong), per_class // 2)]
        chosen += wrong[: per_class - len(take_right)] + take_right
    return chosen


def explain(model: str | Path, data: str | ImageSet, out: str | Path, options: ExplainOptions | None = None) -> dict[str, Any]:
    """Write ``report.html`` and ``report.json`` for ``model`` on ``data`` into ``out``.

    Parameters
    ----------
    model : path-like
        ``model.safetensors`` or a run folder (then its ``summary.json`` feeds the model card).
    data : str or ImageSet
        An image folder (one sub-folder per class), ``fashion-mnist`` (its test split),
        or images already loaded (a simulation's test set).
    out : path-like
        Folder for the report (created).
    """
    o = options or ExplainOptions()
    for name in o.methods:
        get_method(name)  # unknown names fail before any work
    started = time.monotonic()
    torch.manual_seed(o.seed)
    task, meta = load_model(model)
    cfg, classes = task.cfg, list(meta["classes"])
    images = _load_images(data, cfg, classes)
    source = data if isinstance(data, str) else f"{images.name} ({len(images)} images)"
    if len(images) == 0:
        raise DataError(f"{source} holds no readable images")
    _log.info("explaining %s on %d images of %s", model, len(images), source)

    # Performance on every image.
    prepared = task.prepare(images, for_training=False)
    logits = task.predict(prepared)
    perf = classification_report(logits, images.labels, len(classes))
    probs = torch.softmax(logits.float(), 1).numpy()
    labels = images.labels.numpy()
    preds = probs.argmax(1)
    roc = {}
    for c, name in enumerate(classes):
        if 0 < (labels == c).sum() < len(labels):
            fpr, tpr = roc_curve(probs[:, c], labels == c)
            roc[name] = {"fpr": fpr.round(4).tolist(), "tpr": tpr.round(4).tolist(), "auc": perf.roc_auc[c]}

    # Attributions for the chosen examples, on the plain model (eval mode, CPU).
    chosen = _pick(labels, preds, o.per_class, o.seed)
    net = task.model.float().eval()  # channels-last on CPU, as in training: depthwise convs run faster
    x = task.transform(images.images[chosen], train=False).contiguous(memory_format=torch.channels_last)
    predicted = torch.as_tensor(preds[chosen])
    mo = MethodOptions(internal_batch_size=o.internal_batch_size, smoothgrad_samples=o.smoothgrad, seed=o.seed)
    maps, timings, trust = {}, {}, {}
    chance = deletion_insertion(net, x, predicted, random_ranking_maps(tuple(x.shape[:1] + x.shape[2:]), seed=o.seed), seed=o.seed)
    k = min(o.sanity_images, len(chosen))
    spread = torch.as_tensor(np.linspace(0, len(chosen) - 1, k).round().astype(int))  # across all classes
    twin = randomized_copy(net, seed=o.seed + 1)
    for name in o.methods:
        t0 = time.monotonic()
        maps[name] = attribute(name, net, x, predicted, mo)  # explains the predicted class
        timings[name] = time.monotonic() - t0
        faith = deletion_insertion(net, x, predicted, maps[name], seed=o.seed)
        rho = rank_correlation(maps[name][spread], attribute(name, twin, x[spread], predicted[spread], mo))
        trust[name] = {
            "deletion_auc": faith.deletion_auc,
            "insertion_auc": faith.insertion_auc,
            "faithfulness": faith.score - chance.score,
            "deletion_curve": faith.deletion_curve,
            "insertion_curve": faith.insertion_curve,
            "randomisation_rank_correlation": float(np.mean(rho)) if len(rho) else math.nan,
            "flagged": bool(len(rho) and np.mean(rho) >= SANITY_FLAG),
            "seconds": round(time.monotonic() - t0, 2),
        }
        _log.info("%s: faithfulness %+.3f, randomisation rho %.2f%s (%.1fs)", name, trust[name]["faithfulness"],
                  trust[name]["randomisation_rank_correlation"], "  FLAGGED" if trust[name]["flagged"] else "", trust[name]["seconds"])  # fmt: skip

    summary = _run_summary(model)
    hardest = sorted(range(len(classes)), key=lambda c: perf.f1[c] if not math.isnan(perf.f1[c]) else 2.0)[:3]
    report = {
        "model": _model_card(model, meta, summary),
        "data": {"source": source, "images": len(images), "per_class": np.bincount(labels, minlength=len(classes)).tolist()},
        "performance": {**perf.to_dict(), "classes": classes, "hardest_classes": [classes[c] for c in hardest], "roc": roc},
        "methods": {n: {"title": get_method(n).title, "summary": get_method(n).summary} for n in o.methods},
        "trust": {"chance": {"deletion_auc": chance.deletion_auc, "insertion_auc": chance.insertion_auc}, "methods": trust, "sanity_flag_at": SANITY_FLAG},
        "examples": [
            {"index": int(i), "label": classes[labels[i]], "predicted": classes[preds[i]], "confidence": float(probs[i, preds[i]]), "correct": bool(labels[i] == preds[i])}
            for i in chosen
        ],
        "settings": {"methods": list(o.methods), "per_class": o.per_class, "smoothgrad_samples": o.smoothgrad, "seed": o.seed,
                     "sanity_images": k, "image_size": cfg.image_size},  # fmt: skip
        "seconds": None,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from .render import render_html

    html = render_html(report, images.images[chosen], maps)
    report["seconds"] = round(time.monotonic() - started, 2)
    atomic_write_text(out / "report.html", html.replace("__SECONDS__", f"{report['seconds']:.0f}"))
    atomic_write_json(out / "report.json", _finite(report))
    _log.info("report written to %s (%.0fs)", out / "report.html", report["seconds"])
    return report


def _finite(obj: Any) -> Any:
    """JSON has no NaN: undefined numbers (AUC of an absent class) become null."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _run_summary(model: str | Path) -> dict[str, Any]:
    path = Path(model)
    folder = path if path.is_dir() else path.parent
    try:
        return dict(json.loads((folder / "summary.json").read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}


def _model_card(model: str | Path, meta: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    from ..models import get_backbone

    cfg = meta["config"]
    privacy = summary.get("privacy") or {}
    card: dict[str, Any] = {
        "file": str(model),
        "backbone": cfg["backbone"],
        "weights": get_backbone(cfg["backbone"]).weights_source if cfg.get("pretrained", True) else "random initialisation (pretrained = false)",
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
        card["site_privacy"] = {s: {"epsilon": v["epsilon"], "delta": v["delta"]} for s, v in (privacy.get("sites") or {}).items()}
    else:
        card["private"] = None  # unknown: no run summary next to the model
    return card

