"""``fedlens data check``: a site's image folder against the federation's classes, before it joins.

The check runs where the images are and contacts nobody: the federation's classes come
from ``--classes`` (the list the server admin publishes) or ``--classes-from`` (a model
the federation trained, such as the global model a site keeps in its state folder, a
run folder, or a run config).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_commands", "classes_from"]


def classes_from(path: Path) -> tuple[tuple[str, ...], str]:
    """The federation's classes recorded in ``path``, and a description of where they came from.

    ``path`` is a model (``.safetensors``: the classes its checkpoint records), a folder
    holding one (a run folder's ``model.safetensors``, a site state folder's
    ``global-model.safetensors``) or a ``config.toml``, or a run config (``.toml``: its
    ``classes``, else the class folders of its ``data-path``).

    Raises
    ------
    FedlensError
        When ``path`` records no classes.
    """
    from fedlens.shared.checkpoint import GLOBAL_MODEL_FILE, MODEL_FILE, read_checkpoint_meta
    from fedlens.shared.config import load_config, parse_classes
    from fedlens.shared.data import FASHION_MNIST_CLASSES, load_class_map, plan_labels
    from fedlens.shared.data.scan import class_folders
    from fedlens.shared.errors import FedlensError

    if path.is_dir():
        for name in (MODEL_FILE, GLOBAL_MODEL_FILE, "config.toml"):
            if (path / name).is_file():
                return classes_from(path / name)
        raise FedlensError(f"{path} holds no {MODEL_FILE}, {GLOBAL_MODEL_FILE} or config.toml to read the federation's classes from")
    if path.suffix == ".toml":
        cfg = load_config(path)
        if cfg.classes:
            return parse_classes(cfg.classes), f"`classes` in {path}"
        if cfg.dataset == "fashion-mnist":
            return FASHION_MNIST_CLASSES, f"the fashion-mnist classes ({path})"
        if cfg.dataset == "folder":
            class_map = load_class_map(cfg.class_map) if cfg.class_map else None
            plan = plan_labels(class_folders(Path(cfg.data_path)), None, class_map, where=f"data folder {cfg.data_path}")
            return plan.classes, f"the class folders of {cfg.data_path} (data-path in {path})"
        raise FedlensError(f"{path} sets neither `classes` nor a folder data set; pass --classes")
    meta = read_checkpoint_meta(path)
    if not meta.get("classes"):
        raise FedlensError(f"{path} records no classes; pass --classes")
    return tuple(str(c) for c in meta["classes"]), f"the model {path}"


def _cmd_data_check(args: argparse.Namespace) -> int:
    from fedlens.shared.config import parse_classes
    from fedlens.shared.data import check_data, load_class_map, scan_folder
    from fedlens.shared.errors import FedlensError
    from fedlens.shared.io import atomic_write_json

    if args.classes and args.classes_from:
        raise FedlensError("give the federation's classes once: --classes or --classes-from")
    if args.classes:
        classes, source = parse_classes(args.classes), "--classes"
    elif args.classes_from:
        classes, source = classes_from(args.classes_from)
    else:
        classes, source = None, None
    class_map = load_class_map(args.class_map) if args.class_map else None
    scan = scan_folder(args.folder, max_pixels=args.max_image_pixels)
    check = check_data(
        scan, classes=classes, class_map=class_map, batch_size=args.batch_size, eval_fraction=args.site_eval_fraction, classes_from=source
    )
    if args.out:
        atomic_write_json(args.out, check.to_dict())
    print(json.dumps(check.to_dict(), indent=2) if args.json else "\n".join(check.summary()))
    return 1 if check.problems else 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fedlens data ...`` on the ``fedlens`` parser."""
    from fedlens.shared.config import DEFAULT_MAX_IMAGE_PIXELS, FedConfig

    defaults = FedConfig()
    p = sub.add_parser("data", help="check a site's images before it joins", description="A site's data, checked where it is.")
    data = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = data.add_parser(
        "check",
        help="check an image folder against the federation's classes (nothing leaves this machine)",
        description="Per-class counts against the federation's classes (missing, unknown, tiny), how the class map "
        "maps the folders, skipped files with reasons, exact duplicates (also across classes), the size, mode and "
        "bit-depth mix, and what would make DP training weak. Exit status 1 when the site would be refused.",
    )
    q.add_argument("folder", type=Path, metavar="DIR", help="image folder: one sub-folder per class")
    q.add_argument("--classes", metavar="A,B,C", help="the federation's classes, comma-separated (as the server admin publishes them)")
    q.add_argument(
        "--classes-from",
        type=Path,
        metavar="PATH",
        help="read them from a model (.safetensors), a run or site state folder holding one, or a run config (.toml)",
    )
    q.add_argument(
        "--class-map", type=Path, metavar="MAP.toml", help='this site\'s class map: `local folder = "federation class"` or "ignore"'
    )
    q.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="the run's batch-size, if you know it (default %(default)s: the config default)",
    )
    q.add_argument(
        "--site-eval-fraction",
        type=float,
        default=defaults.site_eval_fraction,
        help="the run's site-eval-fraction (default %(default)s)",
    )
    q.add_argument(
        "--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, help="larger images are skipped as decompression bombs"
    )
    q.add_argument("--json", action="store_true", help="print the full report as JSON")
    q.add_argument("--out", type=Path, metavar="FILE", help="also write the JSON report to FILE")
    q.set_defaults(func=_cmd_data_check)
