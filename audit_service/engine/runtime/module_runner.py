"""An in-memory ``torch.nn.Module`` behind the ``ModelRunner`` protocol (the Python API's runner).

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
from .chunks import forward_without_grad
from .torch_runner import TorchRunner
from .validation import check_input_shape


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
