"""The one protocol every model runtime implements: logits in batches, on the model's device.

Gradients (integrated gradients, Jacobians) need a differentiable torch module; a runner offers
one through ``torch_module()`` (TorchScript itself, or an ONNX graph converted by onnx2torch) or
returns ``None`` and says why in ``gradient_note`` — the metrics then fall back to gradient-free
estimates and the report says so. Never a silent zero.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import torch

ModelFormat = Literal["onnx", "torchscript", "pt2", "module"]


@runtime_checkable
class ModelRunner(Protocol):
    format: ModelFormat
    sha256: str
    #: per-sample input shape, e.g. (1, 28, 28) for NCHW images or (D,) for feature vectors
    input_shape: tuple[int, ...]
    num_classes: int
    device: torch.device
    #: human-readable providers / backend, e.g. ["CUDAExecutionProvider", "CPUExecutionProvider"]
    providers: list[str]
    #: why gradients are unavailable (``torch_module()`` is None), else None
    gradient_note: str | None
    #: how gradients are computed when ``torch_module()`` is not None (e.g. "onnx2torch twin ..."), else None
    gradient_path: str | None

    def logits(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """(N, *input_shape) float32 on ``device`` -> (N, num_classes) float32 on ``device``.

        Runs in chunks of ``batch_size``; raises ``ModelRuntimeError`` on NaN/Inf or a bad shape.
        """
        ...

    def torch_module(self) -> torch.nn.Module | None:
        """A differentiable module in eval mode on ``device`` computing the same logits, or None."""
        ...
