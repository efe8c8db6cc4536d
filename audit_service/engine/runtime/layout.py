"""The memory layout of the differentiable module: channels-last where it is the faster convolution layout.

Why: integrated gradients are most of an audit's cost, and on the CPU oneDNN runs NHWC convolutions faster
than NCHW ones: forward + backward a sample on 2 cores, 1.35x (ResNet-18 at 3x64x64) to 1.76x (a two-layer CNN
on 1x28x28) across five architectures (``benchmarks/bench_scale.py --layouts``). A module whose 4-D weights are
channels-last runs every convolution in that layout, whatever the input's strides, so converting the weights
is enough (that is how the benchmark measures it, too).

The conversion is done in place (a copy would double the weights' memory) and it changes the module's forward
too, so it is checked before use: a model that ``.view``s a convolution's output fails in channels-last, and a
model could compute something else. The choice is tried on real inputs against the contiguous logits and
undone when the model fails or differs; ``restore`` puts the caller's module back as it was after the audit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

MemoryFormat = Literal["contiguous", "channels_last"]
Requested = Literal["auto", "contiguous", "channels_last"]

#: channels-last logits must match the contiguous ones within this share of the logits' largest magnitude
#: (both are fp32; a different summation order moves them by about 1e-6)
LAYOUT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class LayoutChoice:
    """Which layout the gradient passes use, and why (``report.model.memory_format``)."""

    memory_format: MemoryFormat
    reason: str
    #: the weights were converted by us (``restore`` converts them back)
    converted: bool = False

    def as_report(self) -> dict:
        return {"used": self.memory_format, "reason": self.reason}


def choose_layout(
    module: torch.nn.Module | None, input_shape: tuple[int, ...], requested: Requested, sample: torch.Tensor
) -> LayoutChoice:
    """Convert ``module``'s weights to channels-last when ``requested`` (or ``auto`` judges it faster) and the
    model still computes the same logits on ``sample`` (a few real inputs on the module's device)."""
    if module is None:
        return LayoutChoice("contiguous", "no differentiable module (gradient-free fallback)")
    own = getattr(module, "choose_own_layout", None)
    if own is not None:  # a module whose weights live in another process chooses there (``jobs.cage``)
        return own(input_shape, requested, sample)
    if requested == "contiguous":
        return LayoutChoice("contiguous", "options.memory_format = contiguous")
    if len(input_shape) != 3:
        return LayoutChoice("contiguous", f"inputs of shape {tuple(input_shape)} are not images (C, H, W)")
    weights = [p for p in list(module.parameters()) + list(module.buffers()) if p.dim() == 4]
    if not weights:
        return LayoutChoice("contiguous", "the model has no 4-D (convolution) weights")
    if not all(w.is_contiguous() for w in weights):
        return LayoutChoice("contiguous", "the model's 4-D weights already have a non-default layout; kept")
    if requested == "auto" and sample.device.type != "cpu":
        return LayoutChoice(
            "contiguous",
            f"auto: channels-last is not yet measured on {sample.device.type}; "
            "set options.memory_format = channels_last to use it",
        )
    return _convert_checked(module, sample, requested)


def restore(module: torch.nn.Module | None, choice: LayoutChoice) -> None:
    """Put ``module``'s weights back in the contiguous layout they had before ``choose_layout``."""
    if module is not None and choice.converted:
        module.to(memory_format=torch.contiguous_format)


def _convert_checked(module: torch.nn.Module, sample: torch.Tensor, requested: Requested) -> LayoutChoice:
    why = (
        "options.memory_format = channels_last"
        if requested == "channels_last"
        else "auto: a convolutional model on CPU images"
    )
    try:
        with torch.no_grad():
            reference = module(sample).float()
    except Exception:  # noqa: BLE001 - the audit's own passes report the model's failures
        return LayoutChoice("contiguous", "the model failed on the layout check's inputs; kept contiguous")
    module.to(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            out = module(sample).float()
        scale = float(reference.abs().max().clamp_min(1e-12))
        error = float((out - reference).abs().max()) / scale
    except Exception as exc:  # noqa: BLE001 - e.g. ``.view`` of a channels-last activation
        module.to(memory_format=torch.contiguous_format)
        return LayoutChoice(
            "contiguous", f"channels-last was tried and the model failed in it ({type(exc).__name__}); kept contiguous"
        )
    if not error <= LAYOUT_TOLERANCE:
        module.to(memory_format=torch.contiguous_format)
        return LayoutChoice(
            "contiguous",
            f"channels-last logits differ from contiguous by {error:.2g} of their "
            f"scale (> {LAYOUT_TOLERANCE}); kept contiguous",
        )
    return LayoutChoice(
        "channels_last", f"{why}; logits match contiguous within {error:.1g} of their scale", converted=True
    )
