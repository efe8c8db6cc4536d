"""An in-memory ``torch.nn.Module`` behind the ``ModelRunner`` protocol (the Python API's runner), and
``TorchRunner``, the base it shares with the TorchScript and ``.pt2`` runners.

A notebook or a training loop audits the module it holds, without exporting it to a file first. The
module is the caller's own, trusted code: it runs in the caller's process, unlike uploads. The runner
never changes the module's parameters (no ``requires_grad_`` on them; gradients are taken with respect
to the inputs only); ``api.audit`` puts it in eval mode for the audit and restores its mode after.
"""

from __future__ import annotations

import hashlib

import torch

from ..errors import ModelError
from .base import ModelFormat
from .chunks import GuardedModule, check_inputs, forward_without_grad, probe_logits, run_chunked
from .validation import check_input_shape

PROBE_BATCH = 2


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
        """Keep ``module`` and learn C from one zero batch (``chunks.probe_logits``). ``runs``: the module as
        the runner calls it (default ``module``), guarded for gradient metrics; ``own``: a loaded module the
        runner may freeze (parameters without gradients, the guard in eval mode), not a caller's module."""
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
        self.num_classes = int(probe_logits(module, input_shape, self.device, batch, what, declared).shape[1])

    def logits(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """(N, *input_shape) -> (N, num_classes) float32 on ``device``, run in chunks of ``batch_size``."""
        x = check_inputs(x, self.input_shape, self.device)
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


class ModuleRunner(TorchRunner):
    """``module`` on ``device`` (moved there), for samples of ``input_shape``."""

    format: ModelFormat = "module"

    def __init__(self, module: torch.nn.Module, input_shape: tuple[int, ...], device: torch.device) -> None:
        if not isinstance(module, torch.nn.Module):
            raise ModelError(f"Expected a torch.nn.Module, but got {type(module).__name__}", field="model")
        shape = check_input_shape(list(input_shape), "the input shape")
        super().__init__(_fingerprint(module), device, "torch", "autograd through the module itself")
        self._hold(module.to(device), shape, "the module", own=False)

    def _forward(self, chunk: torch.Tensor) -> torch.Tensor:
        return forward_without_grad(lambda c: self._module(c).float().clone(), chunk)

    def __repr__(self) -> str:
        return (
            f"ModuleRunner({type(self._module).__name__}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, device={self.device})"
        )


def _fingerprint(module: torch.nn.Module) -> str:
    """sha256 of the architecture's repr and the parameter and buffer values (the report's model id)."""
    digest = hashlib.sha256(repr(module).encode())
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", copy=True).contiguous().numpy().tobytes())
    return digest.hexdigest()
