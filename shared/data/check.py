"""A site's data checked before it joins: classes, unusable files, duplicates, image mix.

:func:`check_data` reads a :func:`~fedlens.shared.data.scan_folder` result against the
federation's classes (through the site's class map) and says what training would do
with the folder: which class each folder lands on, which classes the site has no
images of, what would stop it (:class:`~fedlens.shared.data.LabelMismatch`), and
what would make DP-SGD weak or the model biased. ``fedlens data check`` prints it;
``fedlens client start`` writes it to the site's state folder (``data-check.json``).
The report is the site's own: nothing in it is sent to the server.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import atomic_write_json
from .labels import ClassMap, LabelPlan, plan_labels
from .scan import FolderScan, ImageFacts, SkippedFile, class_folders

__all__ = ["DATA_CHECK_FILE", "TINY_CLASS", "DataCheck", "check_data", "write_data_check"]

DATA_CHECK_FILE = "data-check.json"
_FORMAT = "fedlens-data-check-v1"
# Images: under DP-SGD every example's clipped gradient is drowned in noise scaled to
# the whole batch, so a class with fewer images gives the model next to nothing.
TINY_CLASS = 10
# Largest / smallest class: at 10x the site's update mostly teaches its largest class.
_IMBALANCE = 10
# A class whose share of grey images differs from another's by this much, or whose
# median image is this many times smaller or larger: the model can learn the kind of
# image (scanner, camera, source) instead of the class.
_GREY_SKEW = 0.5
_SIZE_SKEW = 2.0
_LISTED = 20  # files listed per finding (all are counted)
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "DICOM MONOCHROME1", "DICOM MONOCHROME2")


@dataclass(frozen=True)
class DataCheck:
    """What :func:`check_data` found.

    ``problems`` would stop training (the site refuses every round until they are
    fixed); ``warnings`` will not, but make DP training weak or the model biased.
    """

    root: Path
    plan: LabelPlan
    classes_from: str | None
    class_map: str | None
    per_class: dict[str, int]
    folders: dict[str, dict[str, Any]]
    skipped: tuple[SkippedFile, ...]
    duplicates: tuple[tuple[ImageFacts, ...], ...]
    conflicts: tuple[tuple[ImageFacts, ...], ...]
    facts: dict[str, Any]
    warnings: tuple[str, ...]

    @property
    def problems(self) -> tuple[str, ...]:
        return self.plan.problems

    @property
    def images(self) -> int:
        """Usable images in folders that are trained on (or would be, once mapped)."""
        return sum(f["images"] for f in self.folders.values() if f["class"] != "ignore")

    def to_dict(self) -> dict[str, Any]:
        """The JSON report; file paths relative to the folder."""
        rel = self._relative
        return {
            "format": _FORMAT,
            "folder": str(self.root),
            "classes_from": self.classes_from,
            "class_map": self.class_map,
            "classes": list(self.plan.classes),
            "images": self.images,
            "per_class": self.per_class,
            "folders": self.folders,
            "missing": [c for c, n in self.per_class.items() if n == 0],
            "tiny": [c for c, n in self.per_class.items() if 0 < n < TINY_CLASS],
            "unknown": list(self.plan.unknown),
            "ignored": list(self.plan.ignored),
            "unused_map_lines": list(self.plan.unused),
            "problems": list(self.problems),
            "warnings": list(self.warnings),
            "skipped": {
                "files": len(self.skipped),
                "by_reason": dict(Counter(s.category for s in self.skipped).most_common()),
                "first": [f"{rel(s.path)}: {s.reason}" for s in self.skipped[:_LISTED]],
            },
            "duplicates": {
                "groups": len(self.duplicates),
                "extra_copies": sum(len(g) - 1 for g in self.duplicates),
                "first": [[rel(f.path) for f in g] for g in self.duplicates[:_LISTED]],
            },
            "label_conflicts": {
                "groups": len(self.conflicts),
                "first": [[rel(f.path) for f in g] for g in self.conflicts[:_LISTED]],
            },
            "image_facts": self.facts,
        }

    def summary(self) -> list[str]:
        """A few lines for a terminal or a log."""
        against = (
            f"against {len(self.plan.classes)} classes from {self.classes_from}"
            if self.classes_from
            else "without the federation's classes"
        )
        lines = [f"data check of {self.root} ({against}): {self.images} usable images in {len(self.folders)} class folders"]
        lines.append("classes: " + ", ".join(f"{c} {n}" for c, n in self.per_class.items()))
        mapped = [f"{name} -> {info['class']}" for name, info in self.folders.items() if info["class"] not in (name, None)]
        if mapped:
            lines.append("folders: " + ", ".join(mapped))
        if self.skipped:
            reasons = Counter(s.category for s in self.skipped).most_common()
            lines.append(f"skipped {len(self.skipped)} file(s): " + ", ".join(f"{n} {r}" for r, n in reasons))
        lines += [f"WOULD BE REFUSED: {p}" for p in self.problems]
        lines += [f"warning: {w}" for w in self.warnings]
        return lines

    def _relative(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)


def check_data(
    scan: FolderScan,
    *,
    classes: Sequence[str] | None = None,
    class_map: ClassMap | None = None,
    batch_size: int | None,
    eval_fraction: float,
    classes_from: str | None = None,
) -> DataCheck:
    """Check a scanned folder against the federation's ``classes`` (through ``class_map``).

    Parameters
    ----------
    scan : FolderScan
        The folder, as :func:`~fedlens.shared.data.scan_folder` saw it.
    classes : sequence of str, optional
        The federation's label set; ``None``: the folder's own names (then only
        problems that hold for any label set are found, e.g. two folders on one class).
    class_map : ClassMap, optional
        The site's class map.
    batch_size : int or None
        The run's ``batch-size`` (the expected DP-SGD batch); ``None`` when not known yet.
    eval_fraction : float
        The run's ``site-eval-fraction`` (images the site keeps for evaluation).
    classes_from : str, optional
        Where ``classes`` came from, for the report.

    Returns
    -------
    DataCheck
        Problems that would stop training, warnings, and the facts behind them.
    """
    folders = class_folders(scan.root)
    plan = plan_labels(folders, classes, class_map, where=f"data folder {scan.root}", strict=False)
    target = {name: plan.classes[label] for name, label in plan.assigned}
    target.update({name: "ignore" for name in plan.ignored})
    by_folder: dict[str, list[ImageFacts]] = defaultdict(list)
    for image in scan.images:
        by_folder[image.label_dir].append(image)
    skipped_in = Counter(s.path.relative_to(scan.root).parts[0] for s in scan.skipped if s.path.is_relative_to(scan.root))
    folder_info = {name: {"images": len(by_folder[name]), "skipped": skipped_in[name], "class": target.get(name)} for name in folders}
    per_class = {c: 0 for c in plan.classes}
    by_class: dict[str, list[ImageFacts]] = defaultdict(list)
    for name, label in plan.assigned:
        per_class[plan.classes[label]] += len(by_folder[name])
        by_class[plan.classes[label]] += by_folder[name]
    # What training would see: every folder but the ignored ones (unknown ones under their own name).
    used = [(target.get(f.label_dir) or f.label_dir, f) for f in scan.images if target.get(f.label_dir) != "ignore"]
    duplicates, conflicts = _duplicates(used)
    facts = _facts([f for _c, f in used], by_class)
    warnings = _warnings(per_class, facts, duplicates, conflicts, images=len(used), batch_size=batch_size, eval_fraction=eval_fraction)
    return DataCheck(
        root=scan.root,
        plan=plan,
        classes_from=classes_from,
        class_map=class_map.source if class_map else None,
        per_class=per_class,
        folders=folder_info,
        skipped=scan.skipped,
        duplicates=duplicates,
        conflicts=conflicts,
        facts=facts,
        warnings=tuple(warnings),
    )


def _duplicates(
    used: list[tuple[str, ImageFacts]],
) -> tuple[tuple[tuple[ImageFacts, ...], ...], tuple[tuple[ImageFacts, ...], ...]]:
    """Exact copies (same bytes) within one class, and copies filed under different classes."""
    groups: dict[str, list[tuple[str, ImageFacts]]] = defaultdict(list)
    for cls, facts in used:
        groups[facts.sha256].append((cls, facts))
    same: list[tuple[ImageFacts, ...]] = []
    across: list[tuple[ImageFacts, ...]] = []
    for group in groups.values():
        if len(group) > 1:
            files = tuple(f for _c, f in group)
            (across if len({c for c, _f in group}) > 1 else same).append(files)
    return tuple(same), tuple(across)


def _facts(images: list[ImageFacts], by_class: dict[str, list[ImageFacts]]) -> dict[str, Any]:
    """Size, mode and bit-depth mix, overall and per class."""

    def sizes(group: list[ImageFacts]) -> dict[str, Any]:
        if not group:
            return {}
        short = [min(f.width, f.height) for f in group]
        return {
            "smallest": [min(f.width for f in group), min(f.height for f in group)],
            "largest": [max(f.width for f in group), max(f.height for f in group)],
            "median_short_side": statistics.median(short),
            "grey_share": round(sum(f.mode in _GREY_MODES for f in group) / len(group), 3),
        }

    return {
        **sizes(images),
        "modes": dict(Counter(f.mode for f in images).most_common()),
        "bit_depths": {str(k): v for k, v in sorted(Counter(f.bit_depth for f in images).items())},
        "multi_frame": sum(f.frames > 1 for f in images),
        "per_class": {c: sizes(group) for c, group in by_class.items() if group},
    }


def _warnings(
    per_class: dict[str, int],
    facts: dict[str, Any],
    duplicates: tuple[tuple[ImageFacts, ...], ...],
    conflicts: tuple[tuple[ImageFacts, ...], ...],
    *,
    images: int,
    batch_size: int | None,
    eval_fraction: float,
) -> list[str]:
    """What will not stop training but makes DP-SGD weak or the model biased."""
    out = []
    training = images - round(images * eval_fraction)
    if batch_size is not None and training <= batch_size:
        out.append(
            f"about {training} images to train on (after keeping {eval_fraction:.0%} for evaluation), not more than one "
            f"batch (batch-size {batch_size}): DP-SGD needs more, and the site would refuse every round; add images or "
            "ask for a smaller batch-size"
        )
    tiny = {c: n for c, n in per_class.items() if 0 < n < TINY_CLASS}
    if tiny:
        listed = ", ".join(f"{c} ({n})" for c, n in tiny.items())
        out.append(f"classes with fewer than {TINY_CLASS} images: {listed}; under DP-SGD the model learns next to nothing about them here")
    present = [n for n in per_class.values() if n > 0]
    if len(present) > 1 and max(present) >= _IMBALANCE * min(present):
        out.append(
            f"the largest class has {max(present)} images, the smallest {min(present)}: this site's update mostly teaches its largest class"
        )
    if conflicts:
        out.append(
            f"{len(conflicts)} image(s) are filed under two or more classes (exact copies): label noise; keep each in its one right class"
        )
    if duplicates:
        extra = sum(len(g) - 1 for g in duplicates)
        out.append(
            f"{extra} exact duplicate file(s) within a class: each copy is one more example, so the DP guarantee for that "
            "image is weaker (it counts once per copy); remove the copies"
        )
    per = facts.get("per_class", {})
    grey = {c: f["grey_share"] for c, f in per.items()}
    if len(grey) > 1 and max(grey.values()) - min(grey.values()) >= _GREY_SKEW:
        listed = ", ".join(f"{c} {share:.0%}" for c, share in grey.items())
        out.append(f"grey images per class differ a lot ({listed}): the model can learn grey-vs-colour instead of the class")
    short = {c: f["median_short_side"] for c, f in per.items()}
    if len(short) > 1 and max(short.values()) >= _SIZE_SKEW * min(short.values()):
        listed = ", ".join(f"{c} {side:g}px" for c, side in short.items())
        out.append(f"image sizes differ by class (median short side: {listed}): the model can learn the source instead of the class")
    if facts.get("multi_frame"):
        out.append(
            f"{facts['multi_frame']} multi-frame file(s) (DICOM, animated GIF, multi-page TIFF): only the first frame of each is used"
        )
    return out


def write_data_check(check: DataCheck, state_dir: str | Path) -> Path:
    """Write ``check`` to ``STATE_DIR/data-check.json`` (temp file, fsync, rename); returns the path."""
    path = Path(state_dir) / DATA_CHECK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, check.to_dict())
    return path
