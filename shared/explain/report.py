"""Build an explainability report of a fedlens model on a set of labelled images.

Everything runs where the images are (a site, the server, or the end of a
simulation); only the report leaves, and only if its owner sends it.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import FedConfig
from ..data import ClassMap, ImageSet, load_dataset, load_image_folder, plan_labels, relabel
from ..errors import DataError
from ..inference import load_model
from ..io import atomic_write_json, atomic_write_text
from ..metrics import ClassificationReport, classification_report, roc_curve
from .methods import MethodOptions, attribute, get_method
from .trust import SANITY_FLAG, Faithfulness, deletion_insertion, random_ranking_maps, randomized_copy, rank_correlation

__all__ = ["ExplainOptions", "explain"]

_log = logging.getLogger("fedlens.explain")

DEFAULT_METHODS = ("integrated-gradients", "grad-cam", "occlusion", "saliency")


@dataclass(frozen=True)
class ExplainOptions:
    """What a report explains and how; ``seed`` makes it reproducible."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    per_class: int = 10  # images shown (and explained) per class
    smoothgrad: int = 0  # SmoothGrad samples for Integrated Gradients (0 = off)
    sanity_images: int = 16  # images used for the model-randomisation check
    internal_batch_size: int = 32
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _load_images(data: str | ImageSet, task: Any, classes: list[str], class_map: ClassMap | None) -> ImageSet:
    """The images to explain, decoded by the model's own preprocessing, labelled by the model's classes.

    Their class names are mapped onto the model's by name (and through ``class_map``), as
    a site maps its folders onto the federation's classes for training.
    """
    if isinstance(data, str) and data != "fashion-mnist":
        images, _report = load_image_folder(
            data, transform=task.transform, max_pixels=task.cfg.max_image_pixels, classes=classes, class_map=class_map
        )
    else:
        if isinstance(data, str):  # fashion-mnist: its test split
            _train, data = load_dataset(
                FedConfig.from_mapping({"dataset": "fashion-mnist", "data-path": "", "class-map": ""}, base=task.cfg)
            )
        images = relabel(data, plan_labels(data.classes, classes, class_map, where=data.name))
    counts = np.bincount(images.labels.numpy(), minlength=len(classes))
    empty = [c for c, k in zip(classes, counts) if k == 0]
    if empty:
        _log.warning("class(es) %s have no images in %s: no metrics or examples for them in the report", ", ".join(empty), images.name)
    return images


@dataclass(frozen=True)
class _Scores:
    """The model's answers on every image, and what they add up to."""

    perf: ClassificationReport
    probs: np.ndarray  # [N, K] softmax
    labels: np.ndarray  # [N] true class
    preds: np.ndarray  # [N] predicted class
    roc: dict[str, dict[str, Any]]  # one-vs-rest ROC of each class with both positives and negatives


def _score(task: Any, images: ImageSet, classes: list[str]) -> _Scores:
    """Step 1: performance on every image (through the feature cache when it applies)."""
    logits = task.predict(task.prepare(images, for_training=False))
    perf = classification_report(logits, images.labels, len(classes))
    probs = torch.softmax(logits.float(), 1).numpy()
    labels = images.labels.numpy()
    roc = {}
    for c, name in enumerate(classes):
        if 0 < (labels == c).sum() < len(labels):
            fpr, tpr = roc_curve(probs[:, c], labels == c)
            roc[name] = {"fpr": fpr.round(4).tolist(), "tpr": tpr.round(4).tolist(), "auc": perf.roc_auc[c]}
    return _Scores(perf, probs, labels, probs.argmax(1), roc)


def _pick(labels: np.ndarray, preds: np.ndarray, per_class: int, rng: np.random.Generator) -> list[int]:
    """Step 2: per class, up to ``per_class`` images: misclassified ones first (up to half,
    more when there are too few correct ones), then correct ones."""
    chosen: list[int] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        wrong = [i for i in idx if preds[i] != c]
        right = [i for i in idx if preds[i] == c]
        take_right = right[: per_class - min(len(wrong), per_class // 2)]
        chosen += wrong[: per_class - len(take_right)] + take_right
    return chosen


def _method_options(o: ExplainOptions) -> MethodOptions:
    return MethodOptions(internal_batch_size=o.internal_batch_size, smoothgrad_samples=o.smoothgrad, seed=o.seed)


def _attributions(
    net: nn.Module, x: torch.Tensor, predicted: torch.Tensor, o: ExplainOptions
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Step 3: each method's maps of the predicted class, and the seconds each took."""
    mo = _method_options(o)
    maps, seconds = {}, {}
    for name in o.methods:
        t0 = time.monotonic()
        maps[name] = attribute(name, net, x, predicted, mo)
        seconds[name] = time.monotonic() - t0
    return maps, seconds


@dataclass(frozen=True)
class _Trust:
    chance: Faithfulness  # a random ranking: what "no better than chance" scores
    methods: dict[str, dict[str, Any]]  # per method, as written to the report
    sanity_images: int  # images used for the model-randomisation check


def _trust(
    net: nn.Module, x: torch.Tensor, predicted: torch.Tensor, maps: dict[str, torch.Tensor], seconds: dict[str, float], o: ExplainOptions
) -> _Trust:
    """Step 4: how far to trust each method: faithfulness against chance, and the
    model-randomisation check on up to ``sanity_images`` images spread across all classes."""
    mo = _method_options(o)
    chance = deletion_insertion(net, x, predicted, random_ranking_maps(tuple(x.shape[:1] + x.shape[2:]), seed=o.seed), seed=o.seed)
    k = min(o.sanity_images, len(x))
    spread = torch.as_tensor(np.linspace(0, len(x) - 1, k).round().astype(int))
    twin = randomized_copy(net, seed=o.seed + 1)
    trust = {}
    for name, m in maps.items():
        t0 = time.monotonic()
        faith = deletion_insertion(net, x, predicted, m, seed=o.seed)
        rho = rank_correlation(m[spread], attribute(name, twin, x[spread], predicted[spread], mo))
        trust[name] = {
            "deletion_auc": faith.deletion_auc,
            "insertion_auc": faith.insertion_auc,
            "faithfulness": faith.score - chance.score,
            "deletion_curve": faith.deletion_curve,
            "insertion_curve": faith.insertion_curve,
            "randomisation_rank_correlation": float(np.mean(rho)) if len(rho) else math.nan,
            "flagged": bool(len(rho) and np.mean(rho) >= SANITY_FLAG),
            "seconds": round(seconds[name] + time.monotonic() - t0, 2),  # maps and checks
        }
        _log.info(
            "%s: faithfulness %+.3f, randomisation rho %.2f%s (%.1fs)",
            name,
            trust[name]["faithfulness"],
            trust[name]["randomisation_rank_correlation"],
            "  FLAGGED" if trust[name]["flagged"] else "",
            trust[name]["seconds"],
        )
    return _Trust(chance, trust, k)


def _assemble(
    card: dict[str, Any],
    meta: dict[str, Any],
    source: str,
    images: ImageSet,
    scores: _Scores,
    chosen: list[int],
    trust: _Trust,
    o: ExplainOptions,
) -> dict[str, Any]:
    """Step 5: the report as one JSON-ready mapping (``seconds`` is filled in when written)."""
    classes, perf, labels, preds, probs = list(meta["classes"]), scores.perf, scores.labels, scores.preds, scores.probs
    hardest = sorted(range(len(classes)), key=lambda c: perf.f1[c] if not math.isnan(perf.f1[c]) else 2.0)[:3]
    return {
        "model": card,
        "data": {"source": source, "images": len(images), "per_class": np.bincount(labels, minlength=len(classes)).tolist()},
        "performance": {**perf.to_dict(), "classes": classes, "hardest_classes": [classes[c] for c in hardest], "roc": scores.roc},
        "methods": {n: {"title": get_method(n).title, "summary": get_method(n).summary} for n in o.methods},
        "trust": {
            "chance": {"deletion_auc": trust.chance.deletion_auc, "insertion_auc": trust.chance.insertion_auc},
            "methods": trust.methods,
            "sanity_flag_at": SANITY_FLAG,
        },
        "examples": [
            {
                "index": int(i),
                "label": classes[labels[i]],
                "predicted": classes[preds[i]],
                "confidence": float(probs[i, preds[i]]),
                "correct": bool(labels[i] == preds[i]),
            }
            for i in chosen
        ],
        "settings": {
            "methods": list(o.methods),
            "per_class": o.per_class,
            "smoothgrad_samples": o.smoothgrad,
            "seed": o.seed,
            "sanity_images": trust.sanity_images,
            "image_size": meta["config"]["image-size"],
        },
        "seconds": None,
    }


def _write(out: str | Path, report: dict[str, Any], examples: torch.Tensor, maps: dict[str, torch.Tensor], started: float) -> None:
    """Step 6: ``report.html`` and ``report.json`` into ``out`` (created), each written atomically."""
    from .render import render_html

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    html = render_html(report, examples, maps)
    report["seconds"] = round(time.monotonic() - started, 2)
    atomic_write_text(out / "report.html", html.replace("__SECONDS__", f"{report['seconds']:.0f}"))
    atomic_write_json(out / "report.json", _finite(report))
    _log.info("report written to %s (%.0fs)", out / "report.html", report["seconds"])


def explain(
    model: str | Path, data: str | ImageSet, out: str | Path, options: ExplainOptions | None = None, *, class_map: ClassMap | None = None
) -> dict[str, Any]:
    """Write ``report.html`` and ``report.json`` for ``model`` on ``data`` into ``out``.

    The steps: load the model and the images (decoded by the model's own
    :class:`~shared.models.ImageTransform`), score every image, pick examples per
    class, attribute them with each method, measure how far to trust each method,
    then assemble and write the report. Randomness (the choice of examples, noise,
    random rankings and weights) comes from generators seeded with ``options.seed``;
    the global random state is left as it was.

    Parameters
    ----------
    model : path-like
        ``model.safetensors`` or a run folder (then its ``summary.json`` feeds the model card).
    data : str or ImageSet
        An image folder (one sub-folder per class), ``fashion-mnist`` (its test split),
        or images already loaded (a simulation's test set).
    out : path-like
        Folder for the report (created).
    options : ExplainOptions, optional
        Methods, examples per class, SmoothGrad, sanity-check size and seed.
    class_map : ClassMap, optional
        The data's own class names mapped onto the model's (a site's class map); names
        that are the model's classes need no line.

    Returns
    -------
    dict
        The report, as written to ``report.json`` (undefined numbers still NaN).

    Raises
    ------
    CheckpointError
        When ``model`` is not a fedlens safetensors model or does not fit its backbone.
    LabelMismatch
        When the data's class names do not map onto the model's.
    DataError
        When the images cannot be read.
    ValueError
        For an unknown method name (before any work).
    """
    o = options or ExplainOptions()
    for name in o.methods:
        get_method(name)  # unknown names fail before any work
    started = time.monotonic()
    loaded = load_model(model)
    task, meta = loaded.task, loaded.meta
    classes = list(loaded.classes)
    images = _load_images(data, task, classes, class_map)
    source = data if isinstance(data, str) else f"{images.name} ({len(images)} images)"
    if len(images) == 0:
        raise DataError(f"{source} holds no readable images")
    _log.info("explaining %s on %d images of %s", model, len(images), source)

    scores = _score(task, images, classes)
    chosen = _pick(scores.labels, scores.preds, o.per_class, np.random.default_rng(o.seed))
    # Attributions on the plain model (eval mode, CPU), channels-last as in training: depthwise convs run faster.
    net = task.model.float().eval()
    x = task.transform(images.images[chosen]).contiguous(memory_format=torch.channels_last)
    predicted = torch.as_tensor(scores.preds[chosen])  # maps explain the predicted class
    maps, seconds = _attributions(net, x, predicted, o)
    trust = _trust(net, x, predicted, maps, seconds, o)
    report = _assemble(loaded.card, meta, source, images, scores, chosen, trust, o)
    _write(out, report, images.images[chosen], maps, started)
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
