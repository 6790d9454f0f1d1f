"""The federation's label set, and how a site's own class names map onto it.

A run trains one classifier over one ordered list of class names: the federation's
label set (the ``classes`` config key, or else the class names of the server's data).
Label ``i`` is ``classes[i]`` everywhere: at the server, at every site, in every
checkpoint. A site maps its own class names (its folder names) onto that list *by
name*, never by position:

* names are compared by :func:`~shared.config.class_key`: case-folded (Unicode NFKC),
  surrounding blanks dropped, and runs of spaces, underscores and hyphens counted as
  one space, so ``Pleural_Effusion``, ``pleural effusion`` and ``pleural-effusion`` are
  one class;
* the site's class map (:class:`ClassMap`, a small TOML file the site owns) renames
  local classes (``effusion = "pleural effusion"``) or leaves them out
  (``scratch = "ignore"``);
* a federation class the site has no images of is just missing: the site trains on
  what it has, with the federation's full classifier;
* a local class that is neither a federation class nor in the map, and two local
  classes landing on one federation class unless the map names each of them, stop the
  site with :class:`LabelMismatch`: training on a guessed mapping would poison the
  global model without anyone noticing.
"""

from __future__ import annotations

import difflib
import logging
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import IGNORE_CLASS, class_key
from ..errors import ConfigError, DataError
from ._imageset import ImageSet

__all__ = ["IGNORE_CLASS", "ClassMap", "LabelMismatch", "LabelPlan", "class_key", "load_class_map", "plan_labels", "relabel"]

_log = logging.getLogger(f"fedlens.{__name__}")

_RULES = "names are compared ignoring case, and spaces, '_' and '-' count as one"


class LabelMismatch(DataError):
    """A site's class names do not fit the federation's label set; the message says how to map them."""


@dataclass(frozen=True)
class ClassMap:
    """A site's own naming: local class name -> federation class name, or ``"ignore"``.

    Parameters
    ----------
    entries : tuple of (str, str)
        ``(local name, federation name or "ignore")`` pairs, as written.
    source : str
        Where the map comes from (for messages), e.g. its file name.

    A line matches the local name it spells exactly, else any local name that is the
    same by :func:`~shared.config.class_key` (so ``Effusion`` matches a folder
    ``effusion``); two folders that differ only in case each need their exact line.

    Raises
    ------
    ConfigError
        For an empty name, or one local name written twice.
    """

    entries: tuple[tuple[str, str], ...] = ()
    source: str = "the class map"

    def __post_init__(self) -> None:
        for local, target in self.entries:
            if not class_key(local) or not class_key(target):
                raise ConfigError(f'{self.source}: {local!r} = {target!r} has an empty name; write `local name = "federation name"`')
        twice = sorted({local for local, _t in self.entries if [n for n, _t in self.entries].count(local) > 1})
        if twice:
            raise ConfigError(f"{self.source} has more than one line for {', '.join(map(repr, twice))}; keep one")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], *, source: str = "the class map") -> ClassMap:
        """Build from ``{local: target}`` as read from TOML.

        Raises
        ------
        ConfigError
            For a value that is not a string (a table, a number) or an empty name.
        """
        bad = [k for k, v in mapping.items() if not isinstance(v, str)]
        if bad:
            raise ConfigError(
                f'{source}: every line must be `local name = "federation class"` or `= "ignore"`; '
                f"{', '.join(map(repr, bad))} {'is' if len(bad) == 1 else 'are'} not (tables and numbers are not allowed)"
            )
        return cls(tuple((str(k), str(v)) for k, v in mapping.items()), source)

    def target(self, local: str) -> str | None:
        """What the map says for ``local``, or ``None`` when it has no line for it.

        Raises
        ------
        ConfigError
            When only lines spelled differently match ``local`` and they disagree.
        """
        line = self.line(local)
        return None if line is None else dict(self.entries)[line]

    def line(self, local: str) -> str | None:
        """The local name of the line that applies to ``local`` (see :meth:`target`), or ``None``."""
        if local in dict(self.entries):
            return local
        close = [(name, t) for name, t in self.entries if class_key(name) == class_key(local)]
        if len({class_key(t) for _name, t in close}) > 1:
            raise ConfigError(
                f"{self.source} has lines {', '.join(repr(n) for n, _t in close)} that all match the folder {local!r} ({_RULES}) "
                "and say different things; write the line with the folder's exact name"
            )
        return close[0][0] if close else None


def load_class_map(path: str | Path) -> ClassMap:
    """Read a class map file: a flat TOML table of ``local name = "federation class"`` lines.

    ``"ignore"`` as the federation class leaves that local class out of training.
    Quote names that are not bare TOML keys (``"Lungenentzündung" = "pneumonia"``).

    Raises
    ------
    ConfigError
        For a missing or unreadable file, invalid TOML, or a line that is not a name
        mapped to a name.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"class map {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"class map {path} cannot be read ({exc})") from exc
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f'class map {path} is not valid TOML ({exc}); write one `local name = "federation class"` per line') from exc
    return ClassMap.from_mapping(table, source=f"class map {path}")


@dataclass(frozen=True)
class LabelPlan:
    """How one data source's class names land on the federation's label set.

    ``classes`` is the label set (label ``i`` is ``classes[i]``); ``assigned`` the
    local names trained on, each with its label; ``ignored`` the local names the class
    map leaves out; ``unused`` the class map's lines that matched no local name;
    ``unknown`` the local names that land on no class, and ``problems`` what would stop
    training (both empty unless the plan was made with ``strict=False``).
    """

    classes: tuple[str, ...]
    assigned: tuple[tuple[str, int], ...]
    ignored: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def missing(self) -> tuple[str, ...]:
        """Federation classes no local class lands on (the site has no images of them)."""
        have = {label for _name, label in self.assigned}
        return tuple(c for i, c in enumerate(self.classes) if i not in have)


def plan_labels(
    local: Sequence[str],
    classes: Sequence[str] | None = None,
    class_map: ClassMap | None = None,
    *,
    where: str = "the data",
    strict: bool = True,
) -> LabelPlan:
    """Map local class names onto the label set ``classes``, by name.

    Parameters
    ----------
    local : sequence of str
        The data's own class names (class folder names).
    classes : sequence of str, optional
        The label set, in label order. ``None``: the local names themselves (after the
        class map), sorted, as a server's evaluation folder names them.
    class_map : ClassMap, optional
        The data owner's renames and ``ignore`` lines; without one, names map to
        themselves.
    where : str
        The data, for messages (``"site-b's data folder /data/x"``).
    strict : bool, default True
        Raise on problems; ``False`` returns them in the plan (for a data check).

    Raises
    ------
    LabelMismatch
        Naming every local class that is not in the label set (with the map lines that
        would fix it), every map line pointing at a class that is not in it, and every
        federation class two local classes land on without the map naming each of them.
    """
    class_map = class_map or ClassMap()
    targets: dict[str, str] = {}  # local name -> what it is called in the label set (before lookup)
    ignored, explicit = [], set()
    for name in local:
        target = class_map.target(name)
        if target is None:
            targets[name] = name
        elif class_key(target) == IGNORE_CLASS:
            ignored.append(name)
        else:
            targets[name] = target
            explicit.add(name)
    if classes is None:
        by_key: dict[str, str] = {}
        for target in sorted(targets.values()):
            by_key.setdefault(class_key(target), target)
        classes = sorted(by_key.values())
    index = {class_key(c): i for i, c in enumerate(classes)}
    assigned = [(n, index[class_key(t)]) for n, t in targets.items() if class_key(t) in index]
    problems = _problems(targets, explicit, assigned, classes, source=class_map.source, where=where)
    if problems and strict:
        raise LabelMismatch(". Also: ".join(problems))  # one line: logs and error replies keep the last line
    used = {class_map.line(n) for n in local}
    unused = tuple(name for name, _t in class_map.entries if name not in used)
    if unused:
        _log.warning("%s: %s has lines for %s, which %s does not have", where, class_map.source, _names(unused), where)
    nowhere = tuple(n for n, t in targets.items() if class_key(t) not in index)  # unknown, or mapped to no class
    return LabelPlan(tuple(classes), tuple(assigned), tuple(ignored), unused, nowhere, tuple(problems))


def _problems(
    targets: dict[str, str],
    explicit: set[str],
    assigned: list[tuple[str, int]],
    classes: Sequence[str],
    *,
    source: str,
    where: str,
) -> list[str]:
    """What stops training: unknown names, map lines pointing nowhere, unannounced merges."""
    index = {class_key(c) for c in classes}
    problems = []
    unknown = [n for n, t in targets.items() if class_key(t) not in index and n not in explicit]
    if unknown:
        problems.append(_unknown_message(unknown, classes, where=where))
    for name in sorted(n for n, t in targets.items() if n in explicit and class_key(t) not in index):
        problems.append(
            f"{source} says {name!r} = {targets[name]!r}, which is not one of the classes trained on ({_names(classes)}); "
            'fix the name or write "ignore"'
        )
    for label in sorted({label for _n, label in assigned}):
        sources = [n for n, lab in assigned if lab == label]
        if len(sources) > 1 and not all(n in explicit for n in sources):
            lines = " and ".join(f'`"{n}" = "{classes[label]}"`' for n in sources)
            problems.append(
                f"{_names(sources)} in {where} all land on the class {classes[label]!r} ({_RULES}); if they are one class, "
                f'say so in the class map, one line each ({lines}), otherwise rename one of them or map it to "ignore"'
            )
    return problems


def _names(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names)


def _unknown_message(unknown: list[str], classes: Sequence[str], *, where: str) -> str:
    keys = {class_key(c): c for c in classes}
    suggestions = []
    for name in unknown:
        close = difflib.get_close_matches(class_key(name), list(keys), n=1, cutoff=0.6)
        suggestions.append(f'`"{name}" = "{keys[close[0]] if close else IGNORE_CLASS}"`')
    noun = "class" if len(unknown) == 1 else "classes"
    return (
        f"{where} has the {noun} {_names(unknown)}, not one of the classes trained on ({_names(classes)}; {_RULES}). "
        f"Map each onto a class, or leave it out, in a class map file (--class-map FILE) with lines like {', '.join(suggestions)}, "
        "or rename the folders"
    )


def relabel(images: ImageSet, plan: LabelPlan) -> ImageSet:
    """``images`` under ``plan``: labels of the label set, images of ignored classes dropped.

    ``plan`` must have been made from ``images.classes``.
    """
    lookup = np.full(len(images.classes), -1, dtype=np.int64)
    for name, label in plan.assigned:
        lookup[images.classes.index(name)] = label
    labels = lookup[images.labels.numpy()]
    keep = np.flatnonzero(labels >= 0)
    return ImageSet(images.images[torch.as_tensor(keep)], torch.from_numpy(labels[keep]), plan.classes, images.name)
