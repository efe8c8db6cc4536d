"""Models whose graph ends in softmax (or log-softmax): detect it and measure on log-probabilities.

The metrics expect logits. On probabilities LI is tiny whatever the model does and DI (KL of the
softmax of probabilities) is squashed below ~0.15 for 10 classes, so no DI bound can fail. When every
output row is non-negative and sums to 1 the runner is wrapped so that it returns log p: softmax(log p)
is p, so DI is measured on the model's own distribution, and LI on log-probabilities. Outputs that are
already log-probabilities (non-positive, logsumexp 0) need no change and are only reported.
"""

from __future__ import annotations

from typing import Literal

import torch

from .layout import LayoutChoice, Requested, choose_layout

OutputKind = Literal["logits", "probabilities", "log_probabilities"]
#: tolerance on the row sums (float32 softmax rounds to ~1e-7 per class)
ROW_SUM_TOLERANCE = 1e-4
#: floor before the log: a probability of exactly 0 would give -inf
LOG_FLOOR = 1e-12

NOTES = {
    "probabilities": (
        "the model outputs probabilities (rows non-negative, summing to 1): DI is measured on that "
        "distribution and LI on log-probabilities (log p, floored at 1e-12); saliency and the "
        "Jacobian use log p"
    ),
    "log_probabilities": (
        "the model outputs log-probabilities (rows non-positive, logsumexp 0): DI is measured on "
        "exp of them and LI on the log-probabilities as given"
    ),
}


def detect_output_kind(outputs: torch.Tensor) -> OutputKind:
    """What the rows of ``outputs`` (N, C) are; ``logits`` unless every row qualifies."""
    out = outputs.detach().double()
    if out.numel() == 0 or out.shape[-1] < 2:
        return "logits"
    if (out >= 0).all() and ((out.sum(dim=-1) - 1).abs() <= ROW_SUM_TOLERANCE).all():
        return "probabilities"
    if (out <= 0).all() and (torch.logsumexp(out, dim=-1).abs() <= ROW_SUM_TOLERANCE).all():
        return "log_probabilities"
    return "logits"


class _LogOf(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.training = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.inner(x).clamp_min(LOG_FLOOR))

    def choose_own_layout(
        self, input_shape: tuple[int, ...], requested: Requested, sample: torch.Tensor
    ) -> LayoutChoice:
        """The layout is the inner model's (its weights; the log adds none)."""
        return choose_layout(self.inner, input_shape, requested, sample)

    def cuda_batch_limit(self, x: torch.Tensor) -> int:
        from ..metrics.saliency import cuda_batch_limit

        return cuda_batch_limit(self.inner, x)


class LogProbabilityRunner:
    """A runner whose model outputs probabilities, seen through log p (the ``ModelRunner`` protocol)."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self._module: torch.nn.Module | None = None

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def logits(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        return torch.log(self._inner.logits(x, batch_size).clamp_min(LOG_FLOOR))

    def torch_module(self) -> torch.nn.Module | None:
        if self._module is None:
            module = self._inner.torch_module()
            self._module = _LogOf(module) if module is not None else None
        return self._module

    def __repr__(self) -> str:
        return f"LogProbabilityRunner({self._inner!r})"
