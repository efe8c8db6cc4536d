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


#: the quadrature of the integrated-gradients path integral (captum's default, stated in the report)
IG_METHOD = "gausslegendre"
#: Gauss-Legendre node counts tried, fewest first, up to ``options.ig_steps``
STEP_LADDER = (4, 8, 16, 32, 64, 128, 256, 512)
#: the relative completeness error (|sum of attributions - (f(x) - f(0))|, summed over samples, over
#: sum |f(x) - f(0)|) at which a node count is accepted; measured on ``CALIBRATION_SAMPLES`` samples of the first
#: batch (``benchmarks/bench_ig.py``: SI within 0.01 of a 128-step reference at this tolerance)
COMPLETENESS_TOLERANCE = 0.02
CALIBRATION_SAMPLES = 16


@dataclass(frozen=True)
class SaliencyMethod:
    """How attributions are computed for one model; ``name`` and ``note`` go into the report. ``ig`` is the
    integrated-gradients state (steps chosen, completeness) when the method is IG, else None."""

    name: str
    note: str | None
    attribute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ig: "IntegratedGradientsSteps | None" = None

    def describe(self) -> str:
        """The name with the node count the audit settled on (known once the first batch ran)."""
        if self.ig is None or self.ig.steps is None:
            return self.name
        chosen = "chosen by completeness" if self.ig.adaptive else "fixed"
        return (
            f"integrated_gradients(method={IG_METHOD}, n_steps={self.ig.steps} ({chosen}, cap "
            f"{self.ig.max_steps}), baseline=0)"
        )


class IntegratedGradientsSteps:
    """IG on Gauss-Legendre nodes, with the node count chosen once per audit from the completeness error.

    Completeness (IG's own axiom: attributions sum to f(x) - f(baseline)) is checked on the first samples the
    audit attributes: the fewest nodes of ``STEP_LADDER`` (up to ``max_steps``) whose relative error is within
    ``tolerance`` are used for the rest of the audit, else ``max_steps``. ``completeness`` measures the error of
    any later batch, so that the report can say how well the chosen count integrates each condition."""

    def __init__(
        self,
        module: torch.nn.Module,
        max_steps: int,
        internal_batch_size: int,
        adaptive: bool = True,
        tolerance: float = COMPLETENESS_TOLERANCE,
    ) -> None:
        self.module = module
        self.max_steps = max_steps
        self.internal_batch_size = internal_batch_size
        self.adaptive = adaptive
        self.tolerance = tolerance
        self.steps: int | None = None if adaptive else max_steps
        #: (steps, relative completeness error) for each count tried while choosing
        self.tried: list[tuple[int, float | None]] = []
        self._ig = IntegratedGradients(module)
        self._limit: int | None = None

    def attribute(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Signed attributions (B, *S) of ``target`` (B,) with the chosen node count."""
        if self.steps is None:
            self.steps = self._choose(x, target)
        return self._attribute(x, target, self.steps)

    def completeness(self, x: torch.Tensor, target: torch.Tensor, attributions: torch.Tensor) -> tuple[float, float]:
        """(sum over samples of |sum attr - (f_t(x) - f_t(0))|, sum of |f_t(x) - f_t(0)|): their ratio is the
        relative completeness error; sums, so that batches add up."""
        with torch.no_grad():
            both = self.module(torch.cat([x, torch.zeros_like(x[:1])]))
        picked = both[:-1].gather(1, target.view(-1, 1)).squeeze(1).double()
        delta = picked - both[-1].double()[target]
        error = (attributions.reshape(x.shape[0], -1).double().sum(1) - delta).abs()
        return float(error.sum()), float(delta.abs().sum())

    def _choose(self, x: torch.Tensor, target: torch.Tensor) -> int:
        sample, goal = x[:CALIBRATION_SAMPLES], target[:CALIBRATION_SAMPLES]
        ladder = [s for s in STEP_LADDER if s < self.max_steps] + [self.max_steps]
        for steps in ladder:
            error, scale = self.completeness(sample, goal, self._attribute(sample, goal, steps))
            relative = error / scale if scale > 0 else None
            self.tried.append((steps, relative))
            if relative is None or relative <= self.tolerance:
                return steps
        return self.max_steps

    def _attribute(self, x: torch.Tensor, target: torch.Tensor, steps: int) -> torch.Tensor:
        if self._limit is None:
            self._limit = cuda_batch_limit(self.module, x) if x.is_cuda else self.internal_batch_size
        limit = max(1, self._limit)
        parts = []
        with torch.enable_grad():
            for start in range(0, x.shape[0], limit):
                part = x[start : start + limit]
                attr = self._ig.attribute(
                    part,
                    baselines=torch.zeros_like(part),
                    target=target[start : start + limit],
                    n_steps=steps,
                    method=IG_METHOD,
                    internal_batch_size=max(limit, part.shape[0]),
                )
                parts.append(attr.detach())
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def integrated_gradients(
    module: torch.nn.Module,
    n_steps: int,
    internal_batch_size: int,
    adaptive: bool = False,
    tolerance: float = COMPLETENESS_TOLERANCE,
) -> SaliencyMethod:
    """IG (zero baseline, Gauss-Legendre nodes) with the model passes batched over steps and samples together:
    each captum call gets up to ``limit`` samples and runs ``limit`` (sample, step) evaluations a pass. On the CPU
    ``limit`` is ``internal_batch_size`` (options.batch_size); on CUDA it is sized to the free device memory,
    measured once with one forward + backward (``cuda_batch_limit``), so a large orbit batch never runs out of it.
    ``adaptive``: ``n_steps`` is the cap and the node count is chosen from the completeness error
    (``IntegratedGradientsSteps``); otherwise exactly ``n_steps`` nodes."""
    steps = IntegratedGradientsSteps(module, n_steps, internal_batch_size, adaptive, tolerance)
    name = (
        f"integrated_gradients(method={IG_METHOD}, n_steps<={n_steps} by completeness, baseline=0)"
        if adaptive
        else f"integrated_gradients(method={IG_METHOD}, n_steps={n_steps}, baseline=0)"
    )
    return SaliencyMethod(name, None, steps.attribute, steps)


#: the share of the free device memory the IG passes may fill (the rest: the orbit, maps, allocator slack)
CUDA_MEMORY_FRACTION = 0.5


def cuda_batch_limit(
    module: torch.nn.Module, x: torch.Tensor, fraction: float = CUDA_MEMORY_FRACTION, probe: int = 4
) -> int:
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


def occlusion(
    forward: Callable[[torch.Tensor], torch.Tensor], input_shape: tuple[int, ...], reason: str
) -> SaliencyMethod:
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
            return occ.attribute(
                x, sliding_window_shapes=window, strides=window, baselines=0.0, target=target, perturbations_per_eval=64
            ).detach()

    note = (
        f"{reason}; saliency is a gradient-free occlusion estimate (window {window}), "
        "so SI is not directly comparable to the paper's integrated-gradients SI"
    )
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
        m = TF.gaussian_blur(m, kernel_size=[GAUSSIAN_KERNEL, GAUSSIAN_KERNEL], sigma=[GAUSSIAN_SIGMA, GAUSSIAN_SIGMA])
    return m
