"""TorchScript archives (torch.jit.save) through torch.jit.load.

Why torch.jit.load is acceptable for untrusted files while Python pickles are refused: a TorchScript
archive's pickled parts are read by TorchScript's own restricted unpickler, which rebuilds tensors
and TorchScript classes only and cannot call arbitrary Python callables; the model's code is
TorchScript, interpreted by torch, not Python. (The audit still runs in a resource-limited worker.)

TorchScript does not record the input shape, so it comes from the caller (``input_shape``), from
an ``input_shape.json`` extra file saved with the archive, or from an ``input_shape`` attribute.
"""

from __future__ import annotations

import io
import json
import warnings

import torch

from ..errors import ModelError
from .archive import check_zip_bounds
from .base import ModelFormat
from .torch_runner import TorchRunner
from .validation import check_input_shape, short_error

SHAPE_FILE = "input_shape.json"
_NO_SHAPE = (
    "Expected the input shape: TorchScript does not record it; pass probes or the shape (the CLI's "
    "--input-shape 1,28,28, input_shape= in Python), or save with "
    "_extra_files={'input_shape.json': '[1, 28, 28]'}"
)


class TorchScriptRunner(TorchRunner):
    """A TorchScript classifier behind the ``ModelRunner`` protocol; it is its own gradient module."""

    format: ModelFormat = "torchscript"

    def __init__(
        self, data: bytes, sha256: str, device: torch.device, input_shape: tuple[int, ...] | None = None
    ) -> None:
        super().__init__(sha256, device, "torch.jit", "TorchScript module (autograd)")
        extra = {SHAPE_FILE: ""}
        check_zip_bounds(data, "a TorchScript archive")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": still the safe loader
                module = torch.jit.load(io.BytesIO(data), map_location=device, _extra_files=extra)
        except Exception as exc:
            raise ModelError(
                f"Expected a TorchScript archive torch.jit.load can read, but loading failed: {short_error(exc)}",
                field="model",
            ) from None
        module.eval()
        self._hold(module, _resolve_shape(input_shape, extra[SHAPE_FILE], module))


def _resolve_shape(
    hint: tuple[int, ...] | None, extra_file: str | bytes, module: torch.jit.ScriptModule
) -> tuple[int, ...]:
    """The caller's hint first, then the archive's input_shape.json, then an ``input_shape`` attribute."""
    if hint is not None:
        return check_input_shape(list(hint), "the input_shape argument")
    text = extra_file.decode("utf-8", "replace") if isinstance(extra_file, bytes) else extra_file
    if text and text.strip():
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(
                f"Expected {SHAPE_FILE} in the archive to hold a JSON list such as [1, 28, 28], but "
                f"it does not parse: {exc}",
                field="model",
            ) from None
        if not isinstance(value, list):
            raise ModelError(
                f"Expected {SHAPE_FILE} to hold a JSON list such as [1, 28, 28], but got {type(value).__name__}",
                field="model",
            )
        return check_input_shape(value, SHAPE_FILE)
    try:
        attribute = module.input_shape
    except (AttributeError, RuntimeError):
        attribute = None
    if isinstance(attribute, (list, tuple)) and attribute:
        return check_input_shape(list(attribute), "the module's input_shape attribute")
    raise ModelError(_NO_SHAPE, field="input_shape")
