"""Predicting on image files: which files a list of paths names, and one result per file."""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data import IMAGE_SUFFIXES
from ..models import ImageDecodeError
from ._predictor import Predictor, stack_images, top_k

__all__ = ["InputFiles", "FileResult", "expand_inputs", "predict_files"]

_GLOB_CHARS = frozenset("*?[")


@dataclass
class InputFiles:
    """What a list of command-line paths names.

    Attributes
    ----------
    files : list of Path
        Files to predict on, in order, each once.
    missing : list of (str, str)
        Paths that name nothing, with the reason.
    ignored : int
        Files inside folders that are not of an image file type (skipped, not failures).
    """

    files: list[Path] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)
    ignored: int = 0


def _walk(folder: Path, found: InputFiles) -> list[Path]:
    out = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            out.append(path)
        else:
            found.ignored += 1
    return out


def expand_inputs(paths: Sequence[str | Path]) -> InputFiles:
    """Turn files, folders and glob patterns into the list of files to predict on.

    - a file is taken whatever its name (the decoder says whether it is an image);
    - a folder is searched recursively for files of an image type (``IMAGE_SUFFIXES``;
      hidden files and folders skipped); other files are counted in ``ignored``;
    - a pattern with ``*``, ``?`` or ``[`` is expanded (``**`` crosses folders), as a
      shell would, for when the shell did not;
    - anything else is listed in ``missing``.

    Files named twice are predicted once.
    """
    found = InputFiles()
    seen: set[Path] = set()

    def add(files: list[Path]) -> None:
        for f in files:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                found.files.append(f)

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            add(_walk(path, found))
        elif path.is_file():
            add([path])
        elif _GLOB_CHARS & set(str(raw)):
            matches = sorted(Path(m) for m in glob.glob(str(raw), recursive=True))
            if not matches:
                found.missing.append((str(raw), "no file matches this pattern"))
            for m in matches:
                add(_walk(m, found) if m.is_dir() else [m])
        else:
            found.missing.append((str(raw), "no such file or folder"))
    return found


@dataclass(frozen=True)
class FileResult:
    """One file's answer: ``top`` (class, probability) pairs, or the ``error`` that stopped it."""

    path: Path
    top: list[tuple[str, float]]
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def predict_files(
    predictor: Predictor,
    files: Sequence[Path],
    *,
    k: int = 3,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> Iterator[FileResult]:
    """Predict ``files`` in batches, yielding one :class:`FileResult` per file, in order.

    Files are decoded by the predictor's own transform (the training preprocessing).
    A file that cannot be read gives a result with ``error`` set; it never stops the
    others.

    Parameters
    ----------
    predictor : Predictor
        The model.
    files : sequence of Path
        From :func:`expand_inputs`.
    k : int
        How many classes to report per file.
    batch_size : int
        Files decoded and run together (memory: ``batch_size`` decoded images).
    progress : callable, optional
        Called with the number of files done after each batch.
    """
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        decoded: list[np.ndarray] = []
        errors: dict[int, str] = {}
        for i, path in enumerate(chunk):
            try:
                decoded.append(predictor.decode(path))
            except ImageDecodeError as exc:
                errors[i] = str(exc)
            except OSError as exc:  # unreadable: permissions, a folder vanished meanwhile
                errors[i] = f"cannot read file ({exc.strerror or exc})"
        answers = iter(top_k(predictor.probabilities(stack_images(decoded)), predictor.classes, k) if decoded else [])
        for i, path in enumerate(chunk):
            yield FileResult(path, [], errors[i]) if i in errors else FileResult(path, next(answers))
        if progress is not None:
            progress(len(chunk))
