"""Batched forward passes with the checks every runner owes its callers (shared by both runtimes).

A runner supplies ``forward(chunk) -> logits``; this module checks the inputs, cuts them into
chunks of ``batch_size``, and checks each chunk's logits (shape, then finiteness) so that a model
that misbehaves on some inputs fails the audit with a clear reason instead of poisoning the metrics.
``GuardedModule`` gives the differentiable module the same courtesy for exceptions.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import ModelError, ModelRuntimeError, ProbeError, model_failures
from .validation import short_error

Forward = Callable[[torch.Tensor], torch.Tensor]


def check_batch(x: torch.Tensor, input_shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``x`` as float32 on ``device``, after checking it is ``(N, *input_shape)``."""
    if not isinstance(x, torch.Tensor):
        raise ProbeError(
            f"Expected a torch.Tensor of shape (N, {', '.join(map(str, input_shape))}), but got {type(x).__name__}",
            field="probes",
        )
    if tuple(x.shape[1:]) != tuple(input_shape) or x.dim() != len(input_shape) + 1:
        raise ProbeError(
            f"Expected inputs of shape (N, {', '.join(map(str, input_shape))}) for this model, "
            f"but got {tuple(x.shape)}",
            field="probes",
        )
    if not (
        x.is_floating_point() or x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)
    ):
        raise ProbeError(f"Expected real-valued inputs, but got dtype {x.dtype}", field="probes")
    return x.detach().to(device=device, dtype=torch.float32)


def run_chunked(forward: Forward, x: torch.Tensor, batch_size: int, num_classes: int) -> torch.Tensor:
    """Logits ``(N, num_classes)`` of ``forward`` over ``x`` in chunks; ``ModelRuntimeError`` on misbehaviour."""
    if batch_size < 1:
        raise ProbeError(f"Expected a batch size >= 1, but got {batch_size}", field="batch_size")
    n = x.shape[0]
    if n == 0:
        return torch.empty((0, num_classes), dtype=torch.float32, device=x.device)
    parts = []
    for start in range(0, n, batch_size):
        chunk = x[start : start + batch_size]
        out = forward(chunk)
        parts.append(check_chunk_logits(out, chunk.shape[0], num_classes))
    logits = parts[0] if len(parts) == 1 else torch.cat(parts)
    check_finite(logits)
    return logits


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` with zero samples appended up to ``size`` (a graph that accepts only that batch size)."""
    n = x.shape[0]
    return x if n >= size else torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))])


def run_in_fixed_batches(call: Forward, x: torch.Tensor, fixed_batch: int) -> torch.Tensor:
    """``call`` on ``x`` in pieces of exactly ``fixed_batch`` samples (the last one zero-padded), the
    padding's outputs dropped: how a graph with a hard-coded batch size (ONNX, ``.pt2``) sees any batch."""
    parts = []
    for start in range(0, x.shape[0], fixed_batch):
        piece = x[start : start + fixed_batch]
        parts.append(call(pad_batch(piece, fixed_batch))[: piece.shape[0]])
    return torch.cat(parts)


def check_chunk_logits(out: object, n: int, num_classes: int) -> torch.Tensor:
    """One chunk's output as float32, after checking it is a tensor of shape ``(n, num_classes)``."""
    if not isinstance(out, torch.Tensor):
        raise ModelRuntimeError(
            f"Expected the model to return one logits tensor, but it returned {type(out).__name__}", field="model"
        )
    if tuple(out.shape) != (n, num_classes):
        raise ModelRuntimeError(
            f"Expected logits of shape ({n}, {num_classes}) for a batch of {n}, but the "
            f"model returned {tuple(out.shape)}",
            field="model",
        )
    if not out.is_floating_point():
        raise ModelRuntimeError(f"Expected floating-point logits, but the model returned {out.dtype}", field="model")
    return out.float()


def check_finite(logits: torch.Tensor) -> None:
    """Raise ``ModelRuntimeError`` naming how many inputs got NaN/Inf logits, and the first of them."""
    bad = ~torch.isfinite(logits).all(dim=1)
    n_bad = int(bad.sum())
    if n_bad:
        first = int(bad.nonzero()[0, 0])
        raise ModelRuntimeError(
            f"The model returned NaN/Inf logits for {n_bad} of {logits.shape[0]} inputs (first at index "
            f"{first}); expected finite logits for every input. Check the model's numerics (e.g. a log or "
            f"division on zero) or the input scaling",
            field="model",
        )


class GuardedModule(torch.nn.Module):
    """A model's differentiable module whose forward failures reach callers as ``ModelRuntimeError``.

    Gradient metrics call the module directly (not through ``run_chunked``); without this, an
    exception raised by the user's model code would surface as a raw traceback.
    """

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with model_failures(f"on a batch of {x.shape[0]}"):
            return self.inner(x)


#: the batch a runner probes its model with at load (a model that hard-codes its batch: that one)
PROBE_BATCH = 2


def probe_logits(
    call: Forward,
    input_shape: tuple[int, ...],
    device: torch.device,
    batch: int,
    what: str = "the model",
    declared: int | None = None,
) -> torch.Tensor:
    """One real forward of ``call`` on a zero batch, returned after checking it is one floating-point (batch, C)
    tensor with C >= 2 (a 1-tuple is unwrapped) and, when the graph declares ``declared`` classes, that many:
    C and the logits' dtype for the runner. ``ModelError`` otherwise. Every runner (ONNX, TorchScript, ``.pt2``,
    in-memory module) loads through this check; ``call`` feeds a hard-coded batch size itself."""
    zeros = torch.zeros((batch, *input_shape), device=device)
    try:
        with torch.no_grad():
            out = call(zeros)
    except Exception as exc:
        raise ModelError(
            f"Expected {what} to run on a zero batch of shape {tuple(zeros.shape)}, but it failed: {short_error(exc)}",
            field="model",
        ) from None
    if isinstance(out, (tuple, list)) and len(out) == 1:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ModelError(
            f"Expected {what} to return one logits tensor (N, C), but it returned {type(out).__name__}", field="model"
        )
    if out.dim() != 2 or out.shape[0] != batch:
        raise ModelError(
            f"Expected logits of shape (N, C), but for a batch of {batch} {what} returned shape {tuple(out.shape)}",
            field="model",
        )
    if not out.is_floating_point():
        raise ModelError(f"Expected floating-point logits, but {what} returned {out.dtype}", field="model")
    classes = int(out.shape[1])
    if declared is not None and declared != classes:
        raise ModelError(f"Expected the {declared} classes {what} declares, but it returned {classes}", field="model")
    if classes < 2:
        raise ModelError(
            f"Expected logits for at least 2 classes, but got (N, {classes}); for a binary "
            f"classifier with one logit z, return the pair (0, z)",
            field="model",
        )
    return out


def forward_without_grad(call: Forward, chunk: torch.Tensor) -> torch.Tensor:
    """``call(chunk)`` under ``torch.inference_mode`` (forward-only metrics), the model's own failures
    raised as ``ModelRuntimeError`` naming the batch size."""
    with model_failures(f"on a batch of {chunk.shape[0]}"), torch.inference_mode():
        return call(chunk)
