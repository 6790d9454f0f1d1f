"""What a site trains and evaluates on, built once per process and reused across rounds.

A simulated site takes its partition of the shared pool (partition-id from
Flower's node config); a deployed site reads its own folder (``data-path`` in
its node config) and maps its class folders by name onto the federation's label
set, which every message carries, through its own class map (``class-map``).
Either way the data is split into a local training part and a local evaluation
part, and the frozen part's outputs are cached when exact.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedlens.shared.config import FedConfig, parse_site_budgets
from fedlens.shared.data import ClassMap, ImageSet, LabelMismatch, load_class_map, load_dataset, load_image_folder
from fedlens.shared.data.partition import partition
from fedlens.shared.errors import ConfigError, DataError
from fedlens.shared.models import get_backbone
from fedlens.shared.privacy import PrivacyLedger, SiteAudit, SiteBudget, SitePrivacy
from fedlens.shared.task import LocalData, Task, local_split

__all__ = ["Site", "load_site", "site_audit", "site_privacy"]

_log = logging.getLogger("fedlens.client.site")


@dataclass
class Site:
    name: str
    task: Task
    train: LocalData
    eval: LocalData
    simulated: bool
    classes: tuple[str, ...] = ()


@functools.lru_cache(maxsize=2)
def _pool(cfg: FedConfig) -> tuple[Task, ImageSet, LocalData]:
    # One Task per process and config: the frozen part is the same for every site and
    # the trainable part is overwritten by each message, so sites share it safely.
    train, _test = load_dataset(cfg)
    task = Task(cfg, train.num_classes)
    return task, train, task.prepare(train, for_training=True)


@functools.lru_cache(maxsize=2)
def _partitions(cfg: FedConfig) -> tuple[np.ndarray, ...]:
    # Every site's indices, computed once per process: a process serves many of a
    # thousand simulated sites, and the split of the pool is one computation for all.
    _task, pool, _data = _pool(cfg)
    return tuple(partition(pool.labels.numpy(), cfg))


@functools.lru_cache(maxsize=4)
def _folder(
    cfg: FedConfig, data_path: str, name: str, classes: tuple[str, ...], class_map: ClassMap | None
) -> tuple[Task, LocalData, np.ndarray]:
    transform = get_backbone(cfg.backbone).transforms(image_size=cfg.image_size)
    images, _report = load_image_folder(
        data_path,
        transform=transform,
        name=name,
        max_pixels=cfg.max_image_pixels,
        classes=classes,
        class_map=class_map,
        where=f"{name}'s data folder {data_path}",
    )
    counts = images.class_counts()
    missing = [c for c, n in zip(classes, counts) if n == 0]
    _log.info(
        "%s: %d images in %d of the federation's %d classes%s",
        name,
        len(images),
        len(classes) - len(missing),
        len(classes),
        f" (none of {', '.join(missing)})" if missing else "",
    )
    task = Task(cfg, len(classes))  # the federation's classifier, whichever classes this site has
    return task, task.prepare(images, for_training=True), images.labels.numpy()


def load_site(cfg: FedConfig, node_config: dict[str, object], *, classes: Sequence[str] | None = None) -> Site:
    """The site described by Flower's ``node_config`` under ``cfg``.

    Parameters
    ----------
    cfg : FedConfig
        The run's configuration.
    node_config : dict
        Flower's node config: the partition of a simulated site, or a deployed site's
        own settings (``data-path``, ``site-name``, ``class-map``, ``device``, ...).
    classes : sequence of str
        The federation's label set, as the server's message carries it. A deployed site
        needs it; a simulated site checks it against the shared pool's.

    Raises
    ------
    LabelMismatch
        When the site's class folders do not fit ``classes`` (unknown names, or two
        landing on one class); nothing is trained then.
    DataError
        For a deployed site given no label set, or unreadable data.
    """
    if _is_simulated(node_config):
        site_id = int(node_config["partition-id"])  # type: ignore[arg-type]
        total = int(node_config.get("num-partitions", cfg.num_sites))  # type: ignore[arg-type]
        if total != cfg.num_sites:
            raise ConfigError(
                f"Flower runs {total} simulated sites but `num-sites` = {cfg.num_sites}; make them equal "
                f'(flwr run . local --federation-config "num-supernodes={cfg.num_sites}")'
            )
        task, pool, pool_data = _pool(cfg)
        idx = _partitions(cfg)[site_id]
        data = pool_data.subset(torch.as_tensor(idx))
        labels = pool.labels.numpy()[idx]
        name = f"site-{site_id}"
        if classes is not None and tuple(classes) != pool.classes:
            raise LabelMismatch(f"{name}: the server's classes ({', '.join(classes)}) are not the pool's ({', '.join(pool.classes)})")
        label_set = pool.classes
    else:
        data_path = str(node_config.get("data-path") or cfg.data_path)
        name = str(node_config.get("site-name") or "site")
        if not classes:
            raise DataError(
                f"{name}: the server sent no class list with its message, so the site cannot tell which label is which; "
                "the server must run the same fedlens release"
            )
        # The site's hardware, and how large an image it agrees to decode, are the site's choice.
        own = {key: node_config[key] for key in ("device", "max-image-pixels") if key in node_config}
        if own:
            cfg = FedConfig.from_mapping(own, base=cfg)
        class_map = load_class_map(str(node_config["class-map"])) if node_config.get("class-map") else None
        label_set = tuple(str(c) for c in classes)
        task, data, labels = _folder(cfg, data_path, name, label_set, class_map)
    train, held = local_split(data, labels, cfg.site_eval_fraction, seed=cfg.seed)
    return Site(name=name, task=task, train=train, eval=held, simulated=_is_simulated(node_config), classes=label_set)


def _is_simulated(node_config: dict[str, object]) -> bool:
    """A simulated site has a partition and no site-owned settings.

    A deployed SuperNode may carry ``partition-id`` too (Flower's examples pass it);
    one that sets its own data path or budget is always treated as a real site.
    """
    own = ("data-path", "max-epsilon", "state-dir", "site-name", "class-map")
    return "partition-id" in node_config and not any(k in node_config for k in own)


def site_privacy(site: Site, node_config: dict[str, object], *, state_root: Path | None) -> SitePrivacy:
    """The site's privacy: its own budget and its ledger, which together run its private rounds.

    A deployed site reads both from its node config (``max-epsilon``, ``delta``,
    ``allow-non-private``, ``min-noise-multiplier``, ``max-rounds``,
    ``max-local-epochs``, ``state-dir``): the server's run config cannot change
    them. A simulated site takes ``site-budgets`` / ``site-max-epsilon`` (default
    ``target-epsilon``) and the run's ``delta``, and keeps its ledger under
    ``state_root``; its other limits are :class:`SiteBudget`'s documented defaults.

    Raises
    ------
    ConfigError
        For a deployed site without ``max-epsilon`` or ``state-dir``.
    """
    cfg = site.task.cfg
    if site.simulated:
        max_epsilon = parse_site_budgets(cfg.site_budgets).get(site.name, cfg.site_max_epsilon or cfg.target_epsilon)
        budget = SiteBudget(max_epsilon=max_epsilon, delta=cfg.delta, allow_non_private=True)
        state = node_config.get("state-dir") or (state_root / site.name if state_root else None)
    else:
        budget = SiteBudget.from_node_config(node_config)
        state = node_config.get("state-dir")
    if not state:
        raise ConfigError(
            f"{site.name} has no state directory for its privacy ledger: set `state-dir` in its node config "
            "(the ledger must outlive the process, or spent epsilon would be forgotten)"
        )
    return SitePrivacy(budget, PrivacyLedger(Path(str(state))), site=site.name)


def site_audit(site: Site, node_config: dict[str, object]) -> SiteAudit | None:
    """The audit log of a site with its own state folder (``state-dir``), else ``None``.

    Private rounds are audited by the site's :class:`SitePrivacy` wherever its ledger
    is; this is for what the ClientApp decides itself (non-private rounds). A
    simulated site has no state folder of its own, and nothing to audit it for.
    """
    state = node_config.get("state-dir")
    return SiteAudit(Path(str(state))) if state and not site.simulated else None
