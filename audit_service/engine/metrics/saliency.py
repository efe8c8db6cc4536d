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
    """IG with the model passes batched over steps and samples together: each captum call gets up to
    ``limit`` samples and runs ``limit`` (sample, step) evaluations a pass. On the CPU ``limit`` is
    ``internal_batch_size`` (options.batch_size); on CUDA it is sized to the free device memory, measured
    once with one forward + backward (``cuda_batch_limit``), so a large orbit batch never runs out of it."""
    ig = IntegratedGradients(module)
    sized: dict[str, int] = {}

    def attribute(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if "limit" not in sized:
            sized["limit"] = cuda_batch_limit(module, x) if x.is_cuda else internal_batch_size
        limit = max(1, sized["limit"])
        parts = []
        with torch.enable_grad():
            for start in range(0, x.shape[0], limit):
                part = x[start:start + limit]
                attr = ig.attribute(
                    part, baselines=torch.zeros_like(part), target=target[start:start + limit], n_steps=n_steps,
                    internal_batch_size=max(limit, part.shape[0]),
                )
                parts.append(attr.detach())
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    return SaliencyMethod(f"integrated_gradients(n_steps={n_steps}, baseline=0)", None, attribute)


#: the share of the free device memory the IG passes may fill (the rest: the orbit, maps, allocator slack)
CUDA_MEMORY_FRACTION = 0.5


def cuda_batch_limit(module: torch.nn.Module, x: torch.Tensor, fraction: float = CUDA_MEMORY_FRACTION,
                     probe: int = 4) -> int:
    """How many samples one forward + backward may hold on ``x``'s CUDA device: the peak memory of one
    probe pass of ``probe`` samples, per sample, against ``fraction`` of the free memory. A module that runs
    in another process (``jobs.cage``) measures there."""
    own = getattr(module, "cuda_batch_limit", None)
    if own is not None:
        return own(x)
    device = x.device
    torch.cuda.synchronize(device)
    free, _ = torch.cuda.mem_get_info(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    sample = x[:probe].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = module(sample)
        torch.autograd.grad(out[:, 0].sum(), sample)
    torch.cuda.synchronize(device)
    per_sample = max(1, (torch.cuda.max_memory_allocated(device) - base) // sample.shape[0])
    del sample, out
    return max(1, int(fraction * free // per_sample))


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
