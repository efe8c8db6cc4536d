"""The shifts as pure, batched tensor functions with explicit strengths (no severities, no specs).

Every function maps (N, *S) to (N, *S) on x's device; randomness comes only from the ``generator``
argument, which must live on x's device. Image shifts act on the last two axes (H, W).
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF


def gaussian_noise(x: torch.Tensor, sigma: torch.Tensor | float, generator: torch.Generator) -> torch.Tensor:
    """``x + sigma * z``, z ~ N(0, 1) i.i.d.; ``sigma`` broadcastable to x (per-channel)."""
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + sigma * z


def blur_kernel_size(sigma: float, h: int, w: int) -> int:
    """Odd kernel ``2 ceil(2 sigma) + 1``, shrunk so the reflect padding fits inside small images."""
    k = 2 * math.ceil(2 * sigma) + 1
    largest = 2 * min(h, w) - 1  # reflect padding needs pad < size
    return max(1, min(k, largest if largest % 2 else largest - 1))


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of every (H, W) plane (reflect padding), via torchvision's ``gaussian_blur``."""
    h, w = x.shape[-2], x.shape[-1]
    k = blur_kernel_size(sigma, h, w)
    if k == 1 or x.numel() == 0:
        return x.clone()
    planes = x.reshape(-1, 1, h, w)
    return TF.gaussian_blur(planes, kernel_size=[k, k], sigma=[sigma, sigma]).reshape(x.shape)


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of each sample, per channel (axis 1 of x) for samples of rank >= 3, else over the whole sample."""
    if x.ndim >= 4:
        return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
    return x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)


def contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``m + (x - m) * factor`` with m the per-sample (per-channel) mean; factor < 1 lowers contrast."""
    m = _per_sample_mean(x)
    return m + (x - m) * factor


def brightness(x: torch.Tensor, delta: torch.Tensor | float) -> torch.Tensor:
    """``x + delta`` (``delta`` broadcastable, per channel)."""
    return x + delta


def occlusion_mask(n: int, h: int, w: int, side: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n, h, w) bool: one ``side x side`` square per sample at a uniformly random position inside the image."""
    side_h, side_w = min(side, h), min(side, w)
    top = torch.randint(0, h - side_h + 1, (n, 1), generator=generator, device=device)
    left = torch.randint(0, w - side_w + 1, (n, 1), generator=generator, device=device)
    rows = torch.arange(h, device=device).unsqueeze(0)
    cols = torch.arange(w, device=device).unsqueeze(0)
    in_rows = (rows >= top) & (rows < top + side_h)  # (n, h)
    in_cols = (cols >= left) & (cols < left + side_w)  # (n, w)
    return in_rows.unsqueeze(2) & in_cols.unsqueeze(1)


def occlude(x: torch.Tensor, side: int, fill: torch.Tensor | float, generator: torch.Generator) -> torch.Tensor:
    """Set one random ``side x side`` square of every sample's (H, W) planes to ``fill`` (per channel)."""
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    mask = occlusion_mask(n, h, w, side, generator, x.device)
    mask = mask.reshape(n, *([1] * (x.ndim - 3)), h, w)
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    return torch.where(mask, fill_t, x)


def blend(x: torch.Tensor, x2: torch.Tensor, beta: float) -> torch.Tensor:
    """The paper's D_{1->2}(beta) = (1 - beta) x + beta x2 (beta = 0 gives x, beta = 1 gives x2, exactly)."""
    return (1.0 - beta) * x + beta * x2


def uniform(
    n: int,
    input_shape: tuple[int, ...],
    low: torch.Tensor,
    high: torch.Tensor,
    generator: torch.Generator,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(n, *input_shape) uniform in [low, high] (broadcastable, per channel)."""
    u = torch.rand((n, *input_shape), generator=generator, device=device, dtype=dtype)
    low = low.to(device=device, dtype=dtype)
    high = high.to(device=device, dtype=dtype)
    return torch.minimum(low + (high - low) * u, high)


def match_rows(second: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` rows of ``second``: itself when the counts agree, else a random permutation of it, cycled."""
    m = second.shape[0]
    if m == n:
        return second
    perm = torch.randperm(m, generator=generator, device=second.device)
    return second[perm[torch.arange(n, device=second.device) % m]]
