"""An in-memory ``torch.nn.Module`` behind the ``ModelRunner`` protocol (the Python API's runner).

A notebook or a training loop audits the module it holds, without exporting it to a file first. The
module is the caller's own, trusted code: it runs in the caller's process, unlike uploads. The runner
never changes the module's parameters (no ``requires_grad_`` on them; gradients are taken with respect
to the inputs only); ``api.audit`` puts it in eval mode for the audit and restores its mode after.
"""

from __future__ import annotations

import hashlib

import torch

from ..errors import AuditError, ModelError, ModelRuntimeError
from .base import ModelFormat
from .chunks import GuardedModule, check_inputs, run_chunked
from .validation import check_input_shape, short_error

PROBE_BATCH = 2


class ModuleRunner:
    """``module`` on ``device`` (moved there), for samples of ``input_shape``."""

    format: ModelFormat = "module"

    def __init__(self, module: torch.nn.Module, input_shape: tuple[int, ...], device: torch.device) -> None:
        if not isinstance(module, torch.nn.Module):
            raise ModelError(f"Expected a torch.nn.Module, but got {type(module).__name__}", field="model")
        self.device = device
        self.input_shape = check_input_shape(list(input_shape), "the input shape")
        self._module = module.to(device)
        self._guarded = GuardedModule(self._module)
        self.providers = [f"torch ({device})"]
        self.gradient_note: str | None = None
        self.gradient_path: str | None = "autograd through the module itself"
        self.sha256 = _fingerprint(module)
        self.num_classes = self._probe()

    def _probe(self) -> int:
        zeros = torch.zeros((PROBE_BATCH, *self.input_shape), device=self.device)
        try:
            with torch.no_grad():
                out = self._module(zeros)
        except Exception as exc:
            raise ModelError(f"Expected the module to run on a zero batch of shape {tuple(zeros.shape)}, but it "
                             f"failed: {short_error(exc)}", field="model") from None
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != PROBE_BATCH:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelError(f"Expected the module to return logits of shape (N, C), but for a batch of "
                             f"{PROBE_BATCH} it returned {shape}", field="model")
        if out.shape[1] < 2:
            raise ModelError(f"Expected logits for at least 2 classes, but got (N, {out.shape[1]})", field="model")
        return int(out.shape[1])

    def logits(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        x = check_inputs(x, self.input_shape, self.device)
        return run_chunked(self._forward, x, batch_size, self.num_classes)

    def _forward(self, chunk: torch.Tensor) -> torch.Tensor:
        try:
            with torch.inference_mode():
                return self._module(chunk).float().clone()
        except AuditError:
            raise
        except Exception as exc:
            raise ModelRuntimeError(f"The module failed on a batch of {chunk.shape[0]}: {short_error(exc)}",
                                    field="model") from None

    def torch_module(self) -> torch.nn.Module:
        return self._guarded

    def __repr__(self) -> str:
        return (f"ModuleRunner({type(self._module).__name__}, input_shape={self.input_shape}, "
                f"num_classes={self.num_classes}, device={self.device})")


def _fingerprint(module: torch.nn.Module) -> str:
    """sha256 of the architecture's repr and the parameter and buffer values (the report's model id)."""
    digest = hashlib.sha256(repr(module).encode())
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", copy=True).contiguous().numpy().tobytes())
    return digest.hexdigest()
