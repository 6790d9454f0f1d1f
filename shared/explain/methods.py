"""Attribution methods (Captum), one shape for all: ``(model, images, targets) -> maps``.

``images`` are preprocessed model inputs ``[N, 3, H, W]``; a map is a non-negative
``[N, H, W]`` tensor (channel-summed magnitude, upsampled to the input for Grad-CAM)
saying how much each pixel mattered for the target class. Methods run on the plain
model in eval mode (never on a privacy wrapper), batched, and are deterministic:
the noise of SmoothGrad comes from a fixed seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Method", "METHODS", "get_method", "method_names", "attribute"]

AttributeFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, "MethodOptions"], torch.Tensor]


@dataclass(frozen=True)
class MethodOptions:
    """Settings shared by the methods (batched evaluation, SmoothGrad)."""

    internal_batch_size: int = 32
    ig_steps: int = 20
    smoothgrad_samples: int = 0  # 0 = plain Integrated Gradients
    smoothgrad_stdev: float = 0.15
    occlusion_window: int = 0  # 0 = a sixth of the image side (patches do not overlap)
    seed: int = 0


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    summary: str  # one line for the report's readers
    fn: AttributeFn


METHODS: dict[str, Method] = {}


def _register(method: Method) -> None:
    if method.name in METHODS:
        raise ValueError(f"attribution method {method.name!r} registered twice")
    METHODS[method.name] = method


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown attribution method {name!r}; choose from {', '.join(METHODS)}") from None


def _to_map(attr: torch.Tensor) -> torch.Tensor:
    return attr.detach().abs().sum(dim=1).float()


def _integrated_gradients(model: nn.Module, x: torch.Tensor, target: torch.Tensor, o: MethodOptions) -> torch.Tensor:
    from captum.attr import IntegratedGradients, NoiseTunnel

    ig = IntegratedGradients(model)
    if o.smoothgrad_samples > 0:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(o.seed)
            attr = NoiseTunnel(ig).attribute(
                x,
                target=target,
                nt_type="smoothgrad",
                nt_samples=o.smoothgrad_samples,
                nt_samples_batch_size=o.internal_batch_size,
                stdevs=o.smoothgrad_stdev,
                n_steps=o.ig_steps,
                internal_batch_size=o.internal_batch_size,
            )
    else:
        attr = ig.attribute(x, target=target, n_steps=o.ig_steps, internal_batch_size=o.internal_batch_size)
    return _to_map(attr)


def _grad_cam(model: nn.Module, x: torch.Tensor, target: torch.Tensor, o: MethodOptions) -> torch.Tensor:
    from captum.attr import LayerAttribution, LayerGradCam

    layer = model.last_conv_stage
    cam = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=False).detach()
    # Relative map: the textbook ReLU keeps only locations with net positive evidence, and on a
    # fine-tuned head the per-location evidence is often negative everywhere (the class wins
    # through its bias), which leaves a blank map. Shifting by the minimum keeps the ranking:
    # brighter = more evidence for the class than the darker regions.
    cam = cam - cam.flatten(1).min(dim=1).values.view(-1, 1, 1, 1)
    up = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    return up.sum(dim=1).clamp_min(0).float()


def _occlusion(model: nn.Module, x: torch.Tensor, target: torch.Tensor, o: MethodOptions) -> torch.Tensor:
    from captum.attr import Occlusion

    side = int(x.shape[-1])
    window = o.occlusion_window or max(2, side // 6)
    stride = window  # non-overlapping patches: 36 forward passes per image
    attr = Occlusion(model).attribute(
        x,
        target=target,
        sliding_window_shapes=(int(x.shape[1]), window, window),
        strides=(int(x.shape[1]), stride, stride),
        baselines=0.0,
        perturbations_per_eval=max(1, 256 // len(x)),  # <= 256 images per forward pass
    )
    # Occlusion credits the drop in the target score; only drops mean "this mattered".
    return attr.detach().sum(dim=1).clamp_min(0).float()


def _saliency(model: nn.Module, x: torch.Tensor, target: torch.Tensor, o: MethodOptions) -> torch.Tensor:
    from captum.attr import Saliency

    return _to_map(Saliency(model).attribute(x, target=target, abs=True))


_register(
    Method(
        "integrated-gradients",
        "Integrated Gradients",
        "sums the model's sensitivity along a path from a blank image to this one",
        _integrated_gradients,
    )
)
_register(
    Method(
        "grad-cam", "Grad-CAM", "which regions of the last feature maps weigh most for the class, relative to the rest (coarse)", _grad_cam
    )
)
_register(Method("occlusion", "Occlusion", "how much the score drops when a patch is covered", _occlusion))
_register(Method("saliency", "Saliency", "how strongly each pixel changes the score (raw gradient)", _saliency))


def attribute(
    method: str, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, options: MethodOptions | None = None
) -> torch.Tensor:
    """Maps ``[N, H, W]`` of ``method`` for ``targets`` (class indices), in batches.

    Parameters
    ----------
    method : str
        One of :func:`method_names`.
    model : nn.Module
        A plain classifier in eval mode (``images -> logits``).
    images : Tensor
        Preprocessed inputs ``[N, 3, H, W]``.
    targets : Tensor
        Class index per image.
    """
    o = options or MethodOptions()
    m = get_method(method)
    out = []
    for i in range(0, len(images), o.internal_batch_size):
        x = images[i : i + o.internal_batch_size].clone().requires_grad_(True)
        out.append(m.fn(model, x, targets[i : i + o.internal_batch_size], o))
    return torch.cat(out) if out else torch.empty(0)
