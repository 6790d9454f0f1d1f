"""A small model with non-trivial weights on disk, and pictures to run it on (the inference and CLI tests)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn.modules.batchnorm import _BatchNorm

from fedlens.shared.checkpoint import save_checkpoint
from fedlens.shared.config import FedConfig
from fedlens.shared.inference import TorchPredictor, load_model, stack_images
from fedlens.shared.task import Task

CLASSES = ["alpha", "beta", "gamma"]


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial values where training would put them: adapters, head, BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def checkpoint(folder: Path, cache_dir: str, *, seed: int = 0) -> Path:
    """A 3-class Lite0 run folder at 32 px (``model.safetensors`` and a ``summary.json``:
    site-a private at epsilon 2.5, site-b not private); ``seed`` picks the weights."""
    cfg = FedConfig.from_mapping({"image-size": 32, "cache-dir": cache_dir, "dataset": "folder", "data-path": "unused", "num-rounds": 3})
    task = Task(cfg, len(CLASSES))
    perturb(task.model, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    save_checkpoint(path, task.model.state_dict(), config=cfg.to_dict(), classes=CLASSES, round=3)
    summary = {
        "num_sites": 2,
        "sites": ["site-a", "site-b"],
        "privacy": {
            "private": False,
            "reason": "site(s) site-b trained without DP-SGD",
            "sites": {"site-a": {"epsilon": 2.5, "delta": 1e-5}},
        },
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return path


def random_pictures(folder: Path, n: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        shape = (24, 24) if i % 2 else (20, 28, 3)  # grey and colour, square and not
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, size=shape).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def labelled_by_the_model(model: Path, root: Path, n: int = 48) -> Path:
    """A labelled folder on which the fp32 model is right by construction (label = its own answer)."""
    predictor = TorchPredictor(load_model(model), fold=False)
    paths = random_pictures(root / "_unsorted", n, seed=3)
    answers = predictor.probabilities(stack_images([predictor.decode(p) for p in paths])).argmax(1)
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for path, c in zip(paths, answers):
        shutil.move(path, root / CLASSES[c] / path.name)
    (root / "_unsorted").rmdir()
    return root
