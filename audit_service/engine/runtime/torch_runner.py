"""``TorchRunner``: what the TorchScript, ``.pt2`` and in-memory module runners share behind the ``ModelRunner``
protocol (the load-time probe, chunked logits, the guarded differentiable module)."""

from __future__ import annotations

import torch

from .base import ModelFormat
from .chunks import PROBE_BATCH, GuardedModule, check_batch, forward_without_grad, probe_logits, run_chunked


class TorchRunner:
    """What every torch runner (TorchScript, ``.pt2``, in-memory module) shares behind the ``ModelRunner``
    protocol: the load-time probe, chunked logits and the guarded differentiable module; a subclass loads its
    module and hands it to ``_hold``."""

    format: ModelFormat
    #: the batch size the model hard-codes (a ``.pt2`` program exported at batch 1), else None
    fixed_batch: int | None = None

    def __init__(self, sha256: str, device: torch.device, backend: str, gradient_path: str) -> None:
        self.sha256 = sha256
        self.device = device
        self.providers = [f"{backend} ({device})"]
        self.gradient_note: str | None = None
        self.gradient_path: str | None = gradient_path

    def _hold(
        self,
        module: torch.nn.Module,
        input_shape: tuple[int, ...],
        what: str = "the model",
        runs: torch.nn.Module | None = None,
        declared: int | None = None,
        own: bool = True,
    ) -> None:
        """Keep ``module`` and learn C from one zero batch through ``runs`` (``chunks.probe_logits``), the module
        as the runner calls it (default ``module``; a ``.pt2`` program's batch padding), guarded for gradient
        metrics; ``own``: a loaded module the runner may freeze (parameters without gradients, the guard in eval
        mode), not a caller's module."""
        if own:
            for param in module.parameters():
                param.requires_grad_(False)
        self._module = module
        self._runs = runs if runs is not None else module
        self._guarded = GuardedModule(self._runs)
        if own:
            self._guarded.training = False  # not .eval(): exported programs refuse it; they were traced in their mode
        self.input_shape = input_shape
        batch = self.fixed_batch or PROBE_BATCH
        self.num_classes = int(probe_logits(self._runs, input_shape, self.device, batch, what, declared).shape[1])

    def logits(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """(N, *input_shape) -> (N, num_classes) float32 on ``device``, run in chunks of ``batch_size``."""
        x = check_batch(x, self.input_shape, self.device)
        return run_chunked(self._forward, x, batch_size, self.num_classes)

    def _forward(self, chunk: torch.Tensor) -> torch.Tensor:
        return forward_without_grad(self._runs, chunk)

    def torch_module(self) -> torch.nn.Module:
        """The module (on ``device``), its forward errors raised as ``ModelRuntimeError``."""
        return self._guarded

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_shape={self.input_shape}, num_classes={self.num_classes}, "
            f"device={self.device}, sha256={self.sha256[:12]}...)"
        )
