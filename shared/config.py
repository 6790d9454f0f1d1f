"""The one run configuration: a frozen, validated dataclass.

Keys are kebab-case in TOML files, ``--set`` overrides and Flower's run config
(``num-rounds``) and snake_case in Python (``num_rounds``). Unknown keys are
rejected with the list of valid ones; values are type- and range-checked before
anything starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = [
    "FedConfig",
    "load_config",
    "parse_overrides",
    "parse_site_budgets",
    "parse_classes",
    "class_key",
    "config_keys",
    "check_epsilon_delta",
    "policy_parts",
    "augment_names",
    "AUGMENTS",
    "ATTACKS",
    "DEFAULT_DELTA",
    "IGNORE_CLASS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "NON_PRIVATE_SETTINGS",
    "parse_attack_sites",
]

DATASETS = ("fashion-mnist", "folder", "npz")
PARTITIONS = ("iid", "dirichlet", "pathological", "quantity")
STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum")
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adam", "sgd")
DP_MODES = ("auto", "book-keeping", "hooks", "functorch")
ACCOUNTANTS = ("rdp", "prv")
CENTRAL_DP = ("off", "server", "client")
AUGMENTS = ("flip", "crop", "color")
# What a class map says for a local class the federation does not train.
IGNORE_CLASS = "ignore"
_CLASS_SEPARATORS = re.compile(r"[\s_-]+")
# Simulation-only attacks a chosen site makes (`fedlens.client.attack`); "none" = honest.
ATTACKS = ("none", "sign-flip", "scale", "label-flip", "nan", "huge-count", "wrong-shape")
_POLICY = re.compile(r"head|full|last-([1-9][0-9]*)")
_HOST_PORT = re.compile(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}")
# 1e-5: well below 1/n for sites of a few thousand images (a delta >= 1/n would allow
# leaking whole records). The default of runs and of sites alike.
DEFAULT_DELTA = 1e-5
# 100 megapixels: above every camera and scanner a site is likely to hold (a 50 MP
# photo, a 4k x 5k mammogram), while a larger header is almost always a
# decompression bomb. Decoding one such image still fits in a few hundred MB.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
# Flower run-config keys that wire the app (where to write) rather than configure ML:
# `out-dir` is the parent of per-Flower-run folders (`flwr run`), `run-dir` one exact
# run folder (`fedlens run`, which can resume it after a server restart).
RUN_DIR_KEY = "run-dir"
APP_KEYS = ("out-dir", RUN_DIR_KEY)


# The defaults of these keys are tuned for DP-SGD (clipped, noised gradients: SGD with a
# large lr, big Poisson batches, low-rank adapters to keep the noise small). Without DP
# they diverge or train poorly, so a `dp = false` config that does not set them takes
# these instead: the best non-private settings found (~90 %, docs/benchmarks.md).
NON_PRIVATE_SETTINGS: dict[str, Any] = {"optimizer": "adam", "lr": 0.001, "batch-size": 64, "lora-rank": 0}


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, *, dp_only: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "dp_only": dp_only})


@dataclass(frozen=True)
class FedConfig:
    """Everything a run needs. Defaults are the embedded main job."""

    # --- data ---------------------------------------------------------------
    dataset: str = _opt("fashion-mnist", "data source", DATASETS)
    data_path: str = _opt("", "folder (ImageFolder layout) or .npz file; for fashion-mnist, a folder with the idx files")
    test_fraction: float = _opt(
        0.2, "folder/npz: stratified share the server keeps as held-out test set (fashion-mnist uses its own test split)"
    )
    site_eval_fraction: float = _opt(0.1, "share of each site's images kept for federated evaluation at the site")
    max_train_images: int = _opt(0, "use at most this many training images, stratified (0 = all); for quick trials")
    max_test_images: int = _opt(0, "use at most this many test images, stratified (0 = all)")
    # Empty by default: the server's data names the classes (its class folders, sorted).
    # Naming them here fixes their order and lets the evaluation folder lack some.
    classes: str = _opt(
        "",
        'the federation\'s label set, in label order, e.g. "normal, pneumonia, pleural effusion" (a list in a TOML file); '
        "empty = the class names of data-path. Sites map their folders onto it by name",
    )
    class_map: str = _opt(
        "",
        'TOML file mapping data-path\'s class names onto `classes` (local = "class" or "ignore"); deployed sites use their own (--class-map)',
    )
    max_image_pixels: int = _opt(
        DEFAULT_MAX_IMAGE_PIXELS,
        "folder images (and DICOM frames) with more pixels than this are skipped as decompression bombs, before decoding",
    )
    # --- federation -----------------------------------------------------------
    num_sites: int = _opt(10, "number of (simulated) sites")
    # 12: under DP the per-site budget, not the round count, limits accuracy (8 and 20
    # rounds at epsilon 3 end within a point), and 12 rounds keep the main job under
    # 15 minutes on 2 cores from a cold cache.
    num_rounds: int = _opt(12, "federated rounds")
    partition: str = _opt("dirichlet", "how simulation splits the pool across sites", PARTITIONS)
    alpha: float = _opt(0.5, "Dirichlet concentration: small = strong label skew (dirichlet), size skew (quantity)")
    classes_per_site: int = _opt(2, "pathological partition: classes each site holds")
    strategy: str = _opt("fedavg", "aggregation strategy", STRATEGIES)
    fraction_train: float = _opt(1.0, "share of sites sampled for training each round, in (0, 1]")
    fraction_evaluate: float = _opt(1.0, "share of sites sampled for federated evaluation, in [0, 1]")
    min_sites: int = _opt(2, "minimum sites per round (training and evaluation)")
    proximal_mu: float = _opt(0.01, "fedprox: weight of the proximal term")
    server_lr: float = _opt(
        0.0, "fedavgm/fedadam/fedyogi: server learning rate (0 = the strategy's usual value: fedavgm 1.0, fedadam/fedyogi 0.01)"
    )
    server_momentum: float = _opt(0.9, "fedavgm: server momentum, in [0, 1)")
    ema_decay: float = _opt(
        0.0,
        "publish an exponential moving average of the rounds' global models with this decay, in [0, 1) (0 = off); post-processing: costs no privacy",
    )
    trim_beta: float = _opt(0.2, "fedtrimmedavg: share trimmed at each end, in [0, 0.5)")
    krum_byzantine: int = _opt(0, "krum: number of malicious sites to tolerate")
    round_timeout: float = _opt(3600.0, "seconds to wait for sites in one round")
    # --- model ----------------------------------------------------------------
    backbone: str = _opt("efficientnet-lite0", "registered backbone name")
    pretrained: bool = _opt(True, "start from ImageNet weights (false = random, logged loudly)")
    weights_path: str = _opt(
        "",
        "local weights file instead of the backbone's default source (for efficientnet-lite0: a copy of the published checkpoint, hash-checked)",
    )
    # last-1 = Lite0's 1x1 head convolution + classifier: 1/8 of the model's bytes
    # travel, it is cheap under DP-SGD, and it beats a linear probe by ~4 points.
    policy: str = _opt("last-1", "fine-tune policy: head, last-N or full")
    # 96 px: Fashion-MNIST is 28 px, but ImageNet features need a 3x3 final map to
    # tell shirts from pullovers (64 px gave ~87 %, 96 px ~91 % centrally).
    # 16: under DP-SGD noise grows with the trained dimensions; rank-16 adapters on the
    # head conv train 26 k numbers instead of 410 k and send 1/16 of the bytes.
    lora_rank: int = _opt(16, "train rank-r low-rank adapters instead of the trainable 1x1 convolutions (0 = train them fully)")
    image_size: int = _opt(96, "side length images are resized to")
    augment: str = _opt("none", "training augmentation: none or a comma list of flip, crop, color")
    dropout: float = _opt(0.2, "dropout before the classifier while training, in [0, 1)")
    # --- optimisation -----------------------------------------------------------
    local_epochs: int = _opt(1, "passes over the local data per round")
    # 32: at batch 64 one epoch gives a site of 800 images 13 steps a round, too little
    # work (on 5 sites of ~800 images federated fell to 0.97 of centralized, 0.92 on
    # another image set); 32 lifts it to 0.98 (docs/benchmarks.md, section 12) and leaves
    # sites of 1,985+ images alone. Not under DP-SGD: there a round is local-epochs x
    # int(1/q) Poisson steps, the steps the noise is calibrated and accounted for.
    local_steps: int = _opt(
        32,
        "non-private runs: at least this many optimiser steps per site and round (further passes over a small site's data; 0 = off). With DP-SGD a round is local-epochs x int(1/q) steps, as accounted",
    )
    # 256 and SGD with momentum: the best private settings in a sweep at epsilon 3
    # (docs/benchmarks.md). Adam rescales every coordinate, so it turns DP noise in the
    # many low-signal coordinates into full-size steps.
    batch_size: int = _opt(256, "training batch size (with DP-SGD: the expected Poisson batch)")
    optimizer: str = _opt("sgd", "site optimiser", OPTIMIZERS)
    lr: float = _opt(0.5, "site learning rate")
    lr_decay: float = _opt(0.9, "multiply the site learning rate by this after every round, in (0, 1]")
    momentum: float = _opt(0.9, "SGD momentum, in [0, 1)")
    adam_eps: float = _opt(
        1e-8, "Adam's epsilon; under DP-SGD a value near the noise level (1e-3 to 1e-2) keeps Adam from amplifying noise"
    )
    weight_decay: float = _opt(0.0, "L2 weight decay of the site optimiser")
    # --- privacy: sample-level DP-SGD at every site ------------------------------
    dp: bool = _opt(True, "train with DP-SGD at every site (false = NOT private, said loudly)")
    target_epsilon: float = _opt(8.0, "epsilon each site spends over the whole run (noise is calibrated once for all rounds)", dp_only=True)
    delta: float = _opt(DEFAULT_DELTA, "delta of the (epsilon, delta) guarantee; keep it well below 1/(images per site)", dp_only=True)
    max_grad_norm: float = _opt(1.0, "per-example gradient clipping bound C of DP-SGD", dp_only=True)
    accountant: str = _opt("rdp", "privacy accountant", ACCOUNTANTS, dp_only=True)
    dp_mode: str = _opt(
        "auto",
        "per-example gradient method: auto picks book-keeping when the trainable part allows it, else hooks",
        DP_MODES,
        dp_only=True,
    )
    dp_reproducible: bool = _opt(
        False,
        "seed DP noise and sampling from the run config (repeatable experiments; whoever knows the config can rebuild the noise, so such runs are reported as NOT private)",
        dp_only=True,
    )
    secure_rng: bool = _opt(
        False,
        "cryptographically secure noise and sampling (Opacus secure_mode; needs torchcsprng); use for production runs",
        dp_only=True,
    )
    site_max_epsilon: float = _opt(0.0, "simulation: each simulated site's own epsilon budget (0 = target-epsilon)", dp_only=True)
    site_budgets: str = _opt("", 'simulation: per-site budgets overriding site-max-epsilon, e.g. "site-0=2,site-3=0.5"', dp_only=True)
    # --- privacy: user-level (central) DP and secure aggregation -------------------
    central_dp: str = _opt(
        "off", "user-level DP via Flower's wrappers: server clips, or sites clip (server adds noise either way)", CENTRAL_DP
    )
    central_noise: float = _opt(1.0, "central DP noise multiplier (std = noise x clip-norm over the summed updates)")
    central_clip: float = _opt(1.0, "central DP clipping bound on each site's model update (L2)")
    central_epsilon: float = _opt(10.0, "central DP budget: the run stops before a round would exceed it")
    central_delta: float = _opt(1e-3, "central DP delta (keep below 1/num-sites)")
    secagg: bool = _opt(False, "secure aggregation (Flower SecAgg+): the server only sees the sum of the site updates")
    secagg_shares: int = _opt(3, "SecAgg+: secret shares per site's key (>= 2)")
    secagg_threshold: int = _opt(2, "SecAgg+: shares needed to reconstruct a dropped site's mask (<= secagg-shares)")
    secagg_clip_range: float = _opt(8.0, "SecAgg+: update values are clipped to +/- this before quantisation")
    # --- robustness: what the server accepts, and when training has diverged -------
    max_update_norm: float = _opt(
        0.0,
        "refuse a site update farther than this (L2) from the global model it started from "
        "(0 = derived from clipping, lr, momentum, steps and noise under DP; no norm rule without DP)",
    )
    # 1,000,000: FedAvg weights each update by the images its site claims, so one site
    # claiming 10^9 would take the average over; no site of a fedlens federation comes
    # near a million images (raise it for one that does).
    max_site_examples: int = _opt(1_000_000, "refuse a site update that claims more training images than this")
    # 10: an honest round's loss rarely doubles; a diverging one grows by orders of magnitude.
    divergence_factor: float = _opt(
        10.0,
        "a site stops its round when its weights turn non-finite or (without DP) a batch loss passes this x its "
        "first batch's; the run stops (exit 1) when the test loss passes this x round 1's (either at least chance "
        "level, ln(classes)) (0 = off)",
    )
    # --- simulation-only attacks ---------------------------------------------------
    attack: str = _opt(
        "none",
        "simulation only: what the sites in attack-sites do (sign-flip: send -delta; scale: send attack-scale x delta; "
        "label-flip: train on labels shifted by one; nan: send NaN; huge-count: claim 10^9 images; wrong-shape: "
        "send an array of the wrong shape)",
        ATTACKS,
    )
    attack_sites: str = _opt("", 'simulation only: partition ids of the attacking sites, e.g. "0,3"; "1=nan" gives site 1 its own attack')
    attack_scale: float = _opt(10.0, "simulation only: the factor of the scale attack (negative: a scaled sign flip)")
    # --- explainability -------------------------------------------------------
    # Small by default: the end-of-simulation report adds ~2 s per explained image on 2 CPU
    # cores; `fedlens explain` makes larger ones.
    report_per_class: int = _opt(2, "test images per class explained in the end-of-simulation report (0 = no report)")
    # --- run ------------------------------------------------------------------
    seed: int = _opt(0, "seed for partitions, sampling, initialisation and shuffling")
    device: str = _opt("auto", "auto uses CUDA when present", DEVICES)
    feature_cache: bool = _opt(True, "cache the frozen part's outputs when no augmentation applies (exact, faster)")
    cache_dir: str = _opt("", "feature/data cache folder (default: $XDG_CACHE_HOME/fedlens)")
    # --- simulation engine (Ray) ------------------------------------------------
    ray_address: str = _opt(
        "",
        "simulation: attach to this running Ray cluster (HOST:PORT of its head, as `ray start --head` prints) "
        "instead of starting a private one on this machine; the run folder and data must be at the same paths on every node",
    )
    site_cpus: float = _opt(1.0, "simulation: CPU cores each simulated site reserves (Ray resource; cores / site-cpus sites run at once)")
    site_gpus: float = _opt(
        0.5, "simulation: share of one GPU each simulated site reserves when sites use CUDA (0.25 = four sites share a GPU)"
    )

    def __post_init__(self) -> None:
        _check_types(self)
        _check_ranges(self)

    # ---- construction -------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, base: FedConfig | None = None) -> FedConfig:
        """Build from kebab-case keys on top of ``base`` (default: the defaults).

        On the defaults, ``dp = false`` also gives every key of :data:`NON_PRIVATE_SETTINGS`
        that ``values`` does not set its non-private value (the defaults are tuned for DP-SGD).

        Raises
        ------
        ConfigError
            On unknown keys, wrong types or out-of-range values.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        updates: dict[str, Any] = {}
        unknown = []
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in names or "_" in key:
                unknown.append(key)
                continue
            if name == "classes" and isinstance(value, (list, tuple)):  # a TOML list of names
                value = _join_classes(value)
            updates[name] = value
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(sorted(unknown))}. Valid keys: {', '.join(config_keys())}")
        if base is None and updates.get("dp") is False:
            # Defaults tuned for DP-SGD diverge without it: what the user left unset takes the non-private value.
            for key, value in NON_PRIVATE_SETTINGS.items():
                updates.setdefault(key.replace("-", "_"), value)
        return dataclasses.replace(base or cls(), **updates)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FedConfig:
        """Build from Flower's run config, ignoring the app-wiring keys (``out-dir``)."""
        return cls.from_mapping({k: v for k, v in run_config.items() if k not in APP_KEYS})

    def server_learning_rate(self) -> float:
        """``server-lr``, or the strategy's usual value when it is 0."""
        if self.server_lr > 0:
            return self.server_lr
        return 1.0 if self.strategy == "fedavgm" else 0.01

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case mapping of every key: the run config Flower carries."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_toml(self) -> str:
        """The resolved configuration as a TOML document that loads back identically."""
        lines = ["# fedlens resolved configuration"]
        for key, value in self.to_dict().items():
            lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def config_keys() -> list[str]:
    """All valid kebab-case keys."""
    return [f.name.replace("_", "-") for f in dataclasses.fields(FedConfig)]


def config_help() -> str:
    """One line per key: name, default and meaning (for ``--help``)."""
    rows = []
    for f in dataclasses.fields(FedConfig):
        key = f.name.replace("_", "-")
        extra = f" ({'|'.join(f.metadata['choices'])})" if f.metadata.get("choices") else ""
        if f.metadata.get("dp_only"):
            extra += " [DP only: ignored with dp = false]"
        if key in NON_PRIVATE_SETTINGS:
            extra += f" [tuned for DP; with dp = false and not set: {_toml_value(NON_PRIVATE_SETTINGS[key])}]"
        rows.append(f"  {key:<20} = {_toml_value(f.default):<22} {f.metadata['help']}{extra}")
    return "\n".join(rows)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _check_types(cfg: FedConfig) -> None:
    for f in dataclasses.fields(cfg):
        key, value, expected = f.name.replace("_", "-"), getattr(cfg, f.name), str(f.type)
        if expected == "float" and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(cfg, f.name, float(value))
            continue
        if f.name == "attack_sites" and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(cfg, f.name, str(value))  # one partition id: `--set attack-sites=3` reads as a TOML integer
            continue
        python_type = {"int": int, "float": float, "bool": bool, "str": str}[expected]
        if not isinstance(value, python_type) or (python_type is int and isinstance(value, bool)):
            raise ConfigError(f"`{key}` must be a {expected}, got {value!r} ({type(value).__name__})")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"`{key}` must be finite, got {value!r}")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"`{key}` = {value!r} is not one of: {', '.join(choices)}")


def _check_ranges(cfg: FedConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    need(0.0 < cfg.test_fraction < 1.0, f"`test-fraction` must be in (0, 1), got {cfg.test_fraction}")
    need(cfg.report_per_class >= 0, f"`report-per-class` must be >= 0, got {cfg.report_per_class}")
    need(0.0 <= cfg.site_eval_fraction < 1.0, f"`site-eval-fraction` must be in [0, 1), got {cfg.site_eval_fraction}")
    need(cfg.max_train_images >= 0 and cfg.max_test_images >= 0, "`max-train-images` and `max-test-images` must be >= 0")
    need(cfg.max_image_pixels >= 1, f"`max-image-pixels` must be at least 1, got {cfg.max_image_pixels}")
    need(cfg.num_sites >= 1, f"`num-sites` must be at least 1, got {cfg.num_sites}")
    need(cfg.num_rounds >= 1, f"`num-rounds` must be at least 1, got {cfg.num_rounds}")
    need(cfg.alpha > 0.0, f"`alpha` must be > 0 (smaller = more skew), got {cfg.alpha}")
    need(cfg.classes_per_site >= 1, f"`classes-per-site` must be at least 1, got {cfg.classes_per_site}")
    need(0.0 < cfg.fraction_train <= 1.0, f"`fraction-train` must be in (0, 1], got {cfg.fraction_train}")
    need(0.0 <= cfg.fraction_evaluate <= 1.0, f"`fraction-evaluate` must be in [0, 1], got {cfg.fraction_evaluate}")
    need(cfg.min_sites >= 1, f"`min-sites` must be at least 1, got {cfg.min_sites}")
    need(
        cfg.min_sites <= cfg.num_sites,
        f"`min-sites` ({cfg.min_sites}) is larger than `num-sites` ({cfg.num_sites}): no round could ever start",
    )
    need(cfg.proximal_mu >= 0.0, f"`proximal-mu` must be >= 0, got {cfg.proximal_mu}")
    need(cfg.server_lr >= 0.0, f"`server-lr` must be >= 0 (0 = the strategy's usual value), got {cfg.server_lr}")
    need(0.0 <= cfg.server_momentum < 1.0, f"`server-momentum` must be in [0, 1), got {cfg.server_momentum}")
    need(0.0 <= cfg.ema_decay < 1.0, f"`ema-decay` must be in [0, 1), got {cfg.ema_decay}")
    need(0.0 <= cfg.trim_beta < 0.5, f"`trim-beta` must be in [0, 0.5), got {cfg.trim_beta}")
    need(cfg.krum_byzantine >= 0, f"`krum-byzantine` must be >= 0, got {cfg.krum_byzantine}")
    need(cfg.round_timeout > 0.0, f"`round-timeout` must be > 0 seconds, got {cfg.round_timeout}")
    need(0.0 <= cfg.dropout < 1.0, f"`dropout` must be in [0, 1), got {cfg.dropout}")
    need(cfg.lora_rank >= 0, f"`lora-rank` must be >= 0 (0 = off), got {cfg.lora_rank}")
    need(16 <= cfg.image_size <= 1024, f"`image-size` must be in [16, 1024], got {cfg.image_size}")
    need(cfg.local_epochs >= 1, f"`local-epochs` must be at least 1, got {cfg.local_epochs}")
    need(cfg.local_steps >= 0, f"`local-steps` must be >= 0 (0 = local-epochs alone), got {cfg.local_steps}")
    need(cfg.batch_size >= 1, f"`batch-size` must be at least 1, got {cfg.batch_size}")
    need(cfg.lr > 0.0, f"`lr` must be > 0, got {cfg.lr}")
    need(0.0 < cfg.lr_decay <= 1.0, f"`lr-decay` must be in (0, 1], got {cfg.lr_decay}")
    need(cfg.adam_eps > 0.0, f"`adam-eps` must be > 0, got {cfg.adam_eps}")
    need(0.0 <= cfg.momentum < 1.0, f"`momentum` must be in [0, 1), got {cfg.momentum}")
    need(cfg.weight_decay >= 0.0, f"`weight-decay` must be >= 0, got {cfg.weight_decay}")
    if cfg.dp:
        check_epsilon_delta(epsilon=cfg.target_epsilon, delta=cfg.delta)
    need(cfg.max_grad_norm > 0.0, f"`max-grad-norm` must be > 0, got {cfg.max_grad_norm}")
    need(cfg.site_max_epsilon >= 0.0, f"`site-max-epsilon` must be >= 0 (0 = target-epsilon), got {cfg.site_max_epsilon}")
    parse_site_budgets(cfg.site_budgets)
    parse_classes(cfg.classes)
    if cfg.central_dp != "off":
        need(cfg.central_noise > 0.0, f"`central-noise` must be > 0, got {cfg.central_noise}")
        need(cfg.central_clip > 0.0, f"`central-clip` must be > 0, got {cfg.central_clip}")
        need(cfg.central_epsilon > 0.0, f"`central-epsilon` must be > 0, got {cfg.central_epsilon}")
        need(0.0 < cfg.central_delta < 1.0, f"`central-delta` must be in (0, 1), got {cfg.central_delta}")
        need(
            cfg.strategy in ("fedavg", "fedprox"),
            f"`central-dp` needs a mean-based strategy (fedavg or fedprox), not {cfg.strategy!r}",
        )
    if cfg.secagg:
        need(
            cfg.strategy == "fedavg",
            f'`secagg = true` needs `strategy = "fedavg"`: the server only sees the sum of updates, '
            f"so {cfg.strategy!r} (which looks at individual updates or keeps optimiser state) cannot run",
        )
        need(
            cfg.central_dp == "off",
            "`secagg = true` cannot be combined with `central-dp` yet: the server only sees the sum, and "
            "fedlens does not add central noise to a SecAgg+ sum. Choose one (sample-level DP-SGD stays on either way)",
        )
        need(cfg.secagg_shares >= 2, f"`secagg-shares` must be >= 2, got {cfg.secagg_shares}")
        need(
            1 <= cfg.secagg_threshold <= cfg.secagg_shares,
            f"`secagg-threshold` must be in [1, secagg-shares = {cfg.secagg_shares}], got {cfg.secagg_threshold}",
        )
        need(cfg.secagg_clip_range > 0.0, f"`secagg-clip-range` must be > 0, got {cfg.secagg_clip_range}")
    need(cfg.site_cpus > 0.0, f"`site-cpus` must be > 0, got {cfg.site_cpus}")
    need(0.0 < cfg.site_gpus <= 1.0, f"`site-gpus` must be in (0, 1] (a share of one GPU), got {cfg.site_gpus}")
    need(
        not cfg.ray_address or _HOST_PORT.fullmatch(cfg.ray_address) is not None,
        f"`ray-address` must be the HOST:PORT of a running Ray cluster's head, e.g. 10.0.0.5:6379 "
        f"(empty = a private local Ray), got {cfg.ray_address!r}",
    )
    need(cfg.max_update_norm >= 0.0, f"`max-update-norm` must be >= 0 (0 = derived under DP), got {cfg.max_update_norm}")
    need(cfg.max_site_examples >= 1, f"`max-site-examples` must be at least 1, got {cfg.max_site_examples}")
    need(
        cfg.divergence_factor == 0.0 or cfg.divergence_factor > 1.0,
        f"`divergence-factor` must be > 1 (or 0 = off), got {cfg.divergence_factor}",
    )
    attacks = parse_attack_sites(cfg.attack_sites, attack=cfg.attack)
    bad_ids = sorted(i for i in attacks if i >= cfg.num_sites)
    need(
        not bad_ids,
        f"`attack-sites` names partition id(s) {bad_ids}, but the simulation has {cfg.num_sites} sites (ids 0..{cfg.num_sites - 1})",
    )
    need(cfg.attack == "none" or bool(attacks), f'`attack = {cfg.attack!r}` needs `attack-sites` (the attacking partition ids, e.g. "0,3")')
    need(cfg.dataset == "fashion-mnist" or bool(cfg.data_path), f"`dataset = {cfg.dataset!r}` needs `data-path`")
    policy_parts(cfg.policy)
    augment_names(cfg.augment)


def check_epsilon_delta(*, epsilon: float, delta: float) -> None:
    """The one rule for a privacy budget: epsilon > 0 and delta in (0, 1).

    Raises
    ------
    ConfigError
        Otherwise.
    """
    if not epsilon > 0:
        raise ConfigError(f"epsilon must be > 0, got {epsilon}; typical budgets are 1 to 8")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}; use well below 1/n, e.g. 1e-5")


def policy_parts(text: str) -> tuple[str, int]:
    """``"head"`` -> ``("head", 0)``, ``"full"`` -> ``("full", 0)``, ``"last-N"`` -> ``("last", N)``.

    Raises
    ------
    ConfigError
        For anything else.
    """
    match = _POLICY.fullmatch(text)
    if not match:
        raise ConfigError(f"unknown fine-tune policy {text!r}; use `head`, `full` or `last-N` with N >= 1 (e.g. last-2)")
    return ("last", int(match.group(1))) if match.group(1) else (text, 0)


def augment_names(text: str) -> tuple[str, ...]:
    """``"none"`` -> ``()``; ``"flip, crop"`` -> ``("flip", "crop")``.

    Raises
    ------
    ConfigError
        For names not in :data:`AUGMENTS`.
    """
    if text.strip() in ("", "none"):
        return ()
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [n for n in names if n not in AUGMENTS]
    if bad:
        raise ConfigError(f"unknown augmentation(s) {', '.join(bad)}; use `none` or a comma list of {', '.join(AUGMENTS)}")
    return names


def parse_site_budgets(text: str) -> dict[str, float]:
    """``"site-0=2,site-3=0.5"`` -> ``{"site-0": 2.0, "site-3": 0.5}``.

    Raises
    ------
    ConfigError
        For items that are not ``SITE=EPSILON`` with a positive epsilon.
    """
    out: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        site, sep, value = item.partition("=")
        try:
            epsilon = float(value) if sep and site.strip() else float("nan")
        except ValueError:
            epsilon = float("nan")
        if not epsilon > 0:
            raise ConfigError(f'`site-budgets` item {item!r} is not SITE=EPSILON with epsilon > 0 (e.g. "site-0=2,site-3=0.5")')
        out[site.strip()] = epsilon
    return out


def class_key(name: str) -> str:
    """The form in which class names are compared: ``"Pleural_Effusion"`` -> ``"pleural effusion"``.

    Unicode NFKC, case-folded, surrounding blanks dropped, and every run of spaces,
    underscores and hyphens counted as one space. Two names with the same key are the
    same class, wherever they are written (config, folder names, class maps).
    """
    folded = unicodedata.normalize("NFKC", name).casefold()
    return " ".join(_CLASS_SEPARATORS.sub(" ", folded).split())


def parse_classes(text: str) -> tuple[str, ...]:
    """``"normal, pneumonia"`` -> ``("normal", "pneumonia")``; ``""`` -> ``()`` (taken from the data).

    Raises
    ------
    ConfigError
        For an empty name, the reserved name ``ignore``, or two names that are the
        same class once compared by :func:`class_key`.
    """
    if not text.strip():
        return ()
    names = tuple(part.strip() for part in text.split(","))
    if not all(class_key(n) for n in names):
        raise ConfigError(f'`classes` = {text!r} has an empty class name; list names separated by commas, e.g. "normal, pneumonia"')
    if any(class_key(n) == IGNORE_CLASS for n in names):
        raise ConfigError(f"`classes` may not contain {IGNORE_CLASS!r}: class maps use it to leave a local class out")
    seen: dict[str, str] = {}
    for n in names:
        if class_key(n) in seen:
            raise ConfigError(
                f"`classes` names one class twice: {seen[class_key(n)]!r} and {n!r} (names are compared ignoring case, "
                "and spaces, '_' and '-' count as one)"
            )
        seen[class_key(n)] = n
    return names


def _join_classes(names: list[Any] | tuple[Any, ...]) -> str:
    if not all(isinstance(n, str) for n in names):
        raise ConfigError(f"`classes` must be a list of names (strings), got {list(names)!r}")
    bad = [n for n in names if "," in n]
    if bad:
        raise ConfigError(f"class names may not contain commas: {', '.join(map(repr, bad))}")
    return ", ".join(names)


def parse_attack_sites(text: str, *, attack: str) -> dict[int, str]:
    """``"0,3"`` with ``attack = "nan"`` -> ``{0: "nan", 3: "nan"}``; ``"1=scale"`` -> ``{1: "scale"}``.

    Items are partition ids; ``ID=KIND`` gives that site an attack of its own.

    Raises
    ------
    ConfigError
        For an item that is not a partition id (or ``ID=KIND`` with a known kind), a site
        named twice, or a plain id while ``attack = "none"``.
    """
    out: dict[int, str] = {}
    kinds = [k for k in ATTACKS if k != "none"]
    for item in filter(None, (part.strip() for part in text.split(","))):
        site, sep, kind = (p.strip() for p in item.partition("="))
        kind = kind if sep else attack
        if not site.isdigit() or (sep and kind not in kinds):
            raise ConfigError(
                f'`attack-sites` item {item!r} is not a partition id or ID=KIND (KIND one of {", ".join(kinds)}), e.g. "0,3" or "1=nan"'
            )
        if kind == "none":
            raise ConfigError(f'`attack-sites` names site {site} but `attack = "none"`: set `attack`, or write {site}=KIND')
        if int(site) in out:
            raise ConfigError(f"`attack-sites` names site {site} twice")
        out[int(site)] = kind
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` strings; values use TOML syntax, bare words are strings.

    Raises
    ------
    ConfigError
        If an item has no ``=``.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. --set num-rounds=3)")
        raw = raw.strip()
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        if isinstance(value, float) and raw.isalpha():  # TOML reads the bare words nan and inf as floats
            value = raw
        out[key.strip()] = value
    return out


def load_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None, *, preset: Mapping[str, Any] | None = None
) -> FedConfig:
    """Defaults, then ``preset``, then a TOML file, then overrides — validated once at the end.

    ``preset`` is a command's own starting point (``fedlens centralized`` starts from
    ``dp = false``, so that the non-private settings apply to what the file and overrides
    leave unset).

    Raises
    ------
    ConfigError
        For an unreadable file, nested tables or any invalid key or value.
    """
    values: dict[str, Any] = dict(preset or {})
    if path is not None:
        path = Path(path)
        try:
            values.update(tomllib.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        nested = [k for k, v in values.items() if isinstance(v, dict) or (isinstance(v, list) and k != "classes")]
        if nested:
            raise ConfigError(f"config file {path}: keys must be flat scalars; {', '.join(nested)} is a table or list")
    values.update(overrides or {})
    return FedConfig.from_mapping(values)
