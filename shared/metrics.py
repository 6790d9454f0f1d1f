"""Classification metrics from logits and labels. Metric names live here, once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ClassificationReport", "classification_report", "roc_auc_ovr", "roc_curve", "SCALAR_KEYS"]

# The scalar metrics every evaluation reports, under these exact names (in
# metrics.jsonl, summary.json, Flower MetricRecords and reports).
SCALAR_KEYS = ("accuracy", "loss", "macro_precision", "macro_recall", "macro_f1", "roc_auc_macro")


@dataclass(frozen=True)
class ClassificationReport:
    """Scalar and per-class metrics of one evaluation."""

    accuracy: float
    loss: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    roc_auc_macro: float
    precision: list[float]
    recall: list[float]
    f1: list[float]
    roc_auc: list[float]
    support: list[int]
    confusion: list[list[int]]
    num_examples: int

    def scalars(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in SCALAR_KEYS}

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: undefined values (AUC of an absent class) become ``None``."""

        def clean(v: object) -> object:
            if isinstance(v, float) and v != v:
                return None
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        return {k: clean(v) for k, v in self.__dict__.items()}


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def roc_auc_ovr(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float]:
    """One-vs-rest ROC-AUC per class (NaN for a class with no positive or no negative).

    Uses the rank-sum (Mann-Whitney U) form, with ties given their average rank.
    """
    out = []
    for c in range(num_classes):
        pos = labels == c
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos == 0 or n_neg == 0:
            out.append(float("nan"))
            continue
        s = scores[:, c]
        order = np.argsort(s, kind="mergesort")
        ranks = np.empty(len(s), dtype=np.float64)
        sorted_s = s[order]
        # average ranks over ties
        _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
        avg = first + (counts - 1) / 2.0 + 1.0
        ranks[order] = np.repeat(avg, counts)
        u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
        out.append(float(u / (n_pos * n_neg)))
    return out


def roc_curve(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold (for plotting)."""
    order = np.argsort(-scores, kind="mergesort")
    pos = positives[order].astype(np.float64)
    tps, fps = np.cumsum(pos), np.cumsum(1.0 - pos)
    distinct = np.r_[np.flatnonzero(np.diff(scores[order])), len(scores) - 1]
    tpr = np.r_[0.0, tps[distinct] / max(tps[-1], 1.0)]
    fpr = np.r_[0.0, fps[distinct] / max(fps[-1], 1.0)]
    return fpr, tpr


def classification_report(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> ClassificationReport:
    """All metrics of one evaluation.

    Parameters
    ----------
    logits : Tensor
        ``[N, K]`` raw scores.
    labels : Tensor
        ``[N]`` true classes.
    num_classes : int
        K; classes absent from ``labels`` get zero support (and NaN AUC).
    """
    logits = logits.detach().float().cpu()
    labels = labels.detach().cpu().long()
    n = int(labels.shape[0])
    if n == 0:
        raise ValueError("cannot compute metrics on an empty evaluation set")
    loss = float(torch.nn.functional.cross_entropy(logits, labels))
    pred = logits.argmax(1).numpy()
    y = labels.numpy()
    cm = np.bincount(y * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = _safe_div(tp, predicted.astype(np.float64))
    recall = _safe_div(tp, support.astype(np.float64))
    f1 = _safe_div(2 * precision * recall, precision + recall)
    present = support > 0  # macro averages over classes present in the labels
    probs = torch.softmax(logits, 1).numpy()
    auc = roc_auc_ovr(probs, y, num_classes)
    auc_valid = [a for a in auc if not np.isnan(a)]
    return ClassificationReport(
        accuracy=float(tp.sum() / n),
        loss=loss,
        macro_precision=float(precision[present].mean()),
        macro_recall=float(recall[present].mean()),
        macro_f1=float(f1[present].mean()),
        roc_auc_macro=float(np.mean(auc_valid)) if auc_valid else float("nan"),
        precision=precision.tolist(),
        recall=recall.tolist(),
        f1=f1.tolist(),
        roc_auc=auc,
        support=support.tolist(),
        confusion=cm.tolist(),
        num_examples=n,
    )
