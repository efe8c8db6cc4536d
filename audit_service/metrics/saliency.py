"""The paper's saliency map: absolute integrated gradients, 0.9 x max threshold, Gaussian filter.

Attributions come from captum. Models with a differentiable torch module use
``IntegratedGradients`` (zero baseline: it is fixed by every permutation and rotation, so the
saliency of an exactly invariant model is exactly equivariant). Models without one (an ONNX op
onnx2torch cannot convert) use captum's gradient-free ``Occlusion`` as a stated estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from captum.attr import IntegratedGradients, Occlusion
from torchvision.transforms.v2 import functional as TF

THRESHOLD_FRACTION = 0.9
GAUSSIAN_KERNEL = 3
GAUSSIAN_SIGMA = 1.0


@dataclass(frozen=True)
class SaliencyMethod:
    """How attributions are computed for one model; ``name`` and ``note`` go into the report."""

    name: str
    note: str | None
    attribute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def integrated_gradients(module: torch.nn.Module, n_steps: int, internal_batch_size: int) -> SaliencyMethod:
    ig = IntegratedGradients(module)

    def attribute(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            attr = ig.attribute(
                x, baselines=torch.zeros_like(x), target=target, n_steps=n_steps,
                internal_batch_size=max(internal_batch_size, x.shape[0]),
            )
        return attr.detach()

    return SaliencyMethod(f"integrated_gradients(n_steps={n_steps}, baseline=0)", None, attribute)


def occlusion(forward: Callable[[torch.Tensor], torch.Tensor], input_shape: tuple[int, ...],
              reason: str) -> SaliencyMethod:
    """Gradient-free fallback: occlude non-overlapping windows (about 12 per spatial axis)."""
    if len(input_shape) >= 2:
        *lead, h, w = input_shape
        win_h, win_w = max(1, math.ceil(h / 12)), max(1, math.ceil(w / 12))
        window = (*lead, win_h, win_w)
    else:
        window = (max(1, math.ceil(input_shape[0] / 64)),)
    occ = Occlusion(forward)

    def attribute(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return occ.attribute(x, sliding_window_shapes=window, strides=window, baselines=0.0,
                                 target=target, perturbations_per_eval=64).detach()

    note = (f"{reason}; saliency is a gradient-free occlusion estimate (window {window}), "
            "so SI is not directly comparable to the paper's integrated-gradients SI")
    return SaliencyMethod(f"occlusion(window={list(window)})", note, attribute)


def postprocess(attributions: torch.Tensor, sample_rank: int) -> torch.Tensor:
    """|attr|, zero below 0.9 x each map's max, then a Gaussian filter (k=3, sigma=1) on (H, W).

    ``attributions`` is (B, *S) with ``sample_rank = len(S)``. Inputs without two spatial axes
    (feature vectors) are not filtered. An all-zero map stays all zero.
    """
    m = attributions.abs()
    flat = m.reshape(m.shape[0], -1)
    peak = flat.max(dim=1, keepdim=True).values
    flat = torch.where(flat >= THRESHOLD_FRACTION * peak, flat, torch.zeros_like(flat))
    m = flat.reshape(m.shape)
    if sample_rank >= 2:
        m = TF.gaussian_blur(m, kernel_size=[GAUSSIAN_KERNEL, GAUSSIAN_KERNEL],
                             sigma=[GAUSSIAN_SIGMA, GAUSSIAN_SIGMA])
    return m
