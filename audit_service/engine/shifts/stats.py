"""Per-channel statistics of the clean probe set: what makes every shift scale-aware.

Models take inputs in their own scale ([0, 1] pixels, ImageNet-normalized values, standardized features),
so shift strengths are set relative to the probes' range (``high - low``) or standard deviation, and the
pure-noise condition draws from the probes' range. The channel is axis 0 of the per-sample shape for inputs
of rank >= 3 ((C, H, W), ...); inputs of rank 1 or 2 ((D,), (H, W)) get one scalar statistic.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

#: std of U(0, 1): the default when no probes are given.
DEFAULT_STD = 0.29


def stat_shape(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of a statistic, broadcastable to (N, *input_shape): (1, C, 1, ..., 1) or (1, 1, ...)."""
    rank = len(input_shape)
    if rank >= 3:
        return (1, int(input_shape[0])) + (1,) * (rank - 1)
    return (1,) * (rank + 1)


@dataclass(frozen=True, eq=False)
class ProbeStats:
    """Per-channel min / max / mean / std of the probes, each broadcastable to ``(1, *S)``."""

    low: torch.Tensor
    high: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def from_probes(cls, x: torch.Tensor) -> "ProbeStats":
        """Statistics of probes ``x`` of shape (N, *S), reduced over the batch and all non-channel axes.

        A zero std or range (a constant channel) is replaced by the largest one over channels, or 1 when
        every channel is constant, so that shifts stay non-trivial.
        """
        if x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(f"Expected probes of shape (N, *S) with N >= 1, but got {tuple(x.shape)}")
        xf = x.detach()
        xf = xf if xf.is_floating_point() else xf.float()
        input_shape = tuple(x.shape[1:])
        if len(input_shape) >= 3:
            per_channel = xf.transpose(0, 1).reshape(input_shape[0], -1)  # (C, N * rest)
        else:
            per_channel = xf.reshape(1, -1)
        low = per_channel.amin(dim=1)
        high = per_channel.amax(dim=1)
        mean = per_channel.mean(dim=1)
        std = per_channel.std(dim=1, correction=0)
        std = _fill_zeros(std)
        shape = stat_shape(input_shape)
        return cls(*(t.reshape(shape) for t in (low, high, mean, std)))

    @classmethod
    def default(cls, input_shape: tuple[int, ...], device: torch.device | str = "cpu") -> "ProbeStats":
        """For clients that give no probes: inputs assumed in [0, 1] (low 0, high 1, mean 0.5, std 0.29)."""
        shape = stat_shape(tuple(input_shape))
        full = lambda v: torch.full(shape, v, dtype=torch.float32, device=device)  # noqa: E731
        return cls(full(0.0), full(1.0), full(0.5), full(DEFAULT_STD))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ProbeStats":
        moved = {f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)}
        return replace(self, **moved)

    @property
    def range(self) -> torch.Tensor:
        """``high - low`` with constant channels replaced (as for std) so range-relative shifts act."""
        return _fill_zeros(self.high - self.low)

    @property
    def device(self) -> torch.device:
        return self.low.device

    def describe(self) -> dict:
        """JSON-ready per-channel values, for the report."""
        return {f.name: getattr(self, f.name).flatten().tolist() for f in fields(self)}


def _fill_zeros(v: torch.Tensor) -> torch.Tensor:
    positive = v > 0
    if bool(positive.all()):
        return v
    fallback = v.max() if bool(positive.any()) else torch.ones((), dtype=v.dtype, device=v.device)
    return torch.where(positive, v, fallback)
