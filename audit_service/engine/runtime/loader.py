"""``load_model``: one entry point from a model file to a checked ``ModelRunner``.

Order matters for safety: size cap, then hash, then format by content (pickles refused unread),
then the format's own checks, then one tiny real forward. Nothing is unpickled on the way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol, Sequence

import torch

from ..errors import ProbeError, SpecError
from .base import ModelFormat, ModelRunner
from .external_data import load_external_data, model_sha256
from .onnx_runner import OnnxRunner
from .pt2_runner import ExportedProgramRunner
from .torchscript_runner import TorchScriptRunner
from .validation import identify, max_model_bytes, read_model_bytes


class Loader(Protocol):
    """Where a model gets loaded: ``load_model`` itself, or a stand-in with its signature (the service's
    cage loads the model in a confined process of its own, ``jobs.cage``)."""

    def __call__(
        self,
        path: str | Path,
        device: str | torch.device = "auto",
        max_bytes: int | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> ModelRunner: ...


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> the first CUDA GPU when torch sees one, else CPU; ``"cuda"`` needs a GPU (``SpecError``)."""
    if isinstance(device, torch.device):
        requested = device
    elif device == "auto" or device is None:
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            requested = torch.device(device)
        except (RuntimeError, TypeError):
            raise SpecError(
                f"Expected device 'auto', 'cpu' or 'cuda', but got {device!r}", field="options.device"
            ) from None
    if requested.type == "cpu":
        return torch.device("cpu")
    if requested.type != "cuda":
        raise SpecError(f"Expected device 'auto', 'cpu' or 'cuda', but got {str(requested)!r}", field="options.device")
    if not torch.cuda.is_available():
        raise SpecError(
            f"Expected device 'auto' or 'cpu' on this machine (no CUDA GPU is available), but got {str(requested)!r}",
            field="options.device",
        )
    index = requested.index or 0
    if index >= torch.cuda.device_count():
        raise SpecError(
            f"Expected a CUDA device index below {torch.cuda.device_count()}, but got {index}", field="options.device"
        )
    return torch.device("cuda", index)


def sniff_format(source: str | Path | bytes, max_bytes: int | None = None) -> ModelFormat:
    """``"onnx"``, ``"torchscript"`` or ``"pt2"`` from the file's content (never its name); ``ModelError`` otherwise."""
    fmt, _ = identify(read_model_bytes(source, max_bytes))
    return fmt


def load_model(
    path: str | Path | bytes,
    device: str | torch.device = "auto",
    max_bytes: int | None = None,
    input_shape: Sequence[int] | None = None,
) -> ModelRunner:
    """Load an ONNX model, TorchScript archive or ``torch.export`` program as a checked ``ModelRunner``.

    ``max_bytes`` defaults to ``AUDIT_MAX_MODEL_BYTES`` or 200 MB, and caps an ONNX graph together with its
    external data: the files the graph names are read from the model file's own folder, as plain file
    names only (``external_data``; their names are in ``runner.external_data``). ``input_shape`` is the per-sample
    shape (batch excluded); TorchScript needs it unless the archive carries ``input_shape.json``,
    and for ONNX, where the graph declares the shape, it must agree. Raises ``ModelError`` for a
    file that cannot be loaded safely or is not an (N, C) classifier, ``SpecError`` for a bad device.
    """
    data = read_model_bytes(path, max_bytes)
    sha256 = hashlib.sha256(data).hexdigest()
    fmt, onnx_model = identify(data)
    target = resolve_device(device)
    hint = tuple(int(d) for d in input_shape) if input_shape is not None else None
    if fmt == "torchscript":
        return TorchScriptRunner(data, sha256, target, input_shape=hint)
    if fmt == "pt2":
        return ExportedProgramRunner(data, sha256, target, input_shape=hint)
    assert onnx_model is not None
    folder = None if isinstance(path, (bytes, bytearray, memoryview)) else Path(path).parent
    files = load_external_data(onnx_model, folder, len(data), max_model_bytes() if max_bytes is None else max_bytes)
    names = tuple(sorted(files))
    if files:  # read into the graph: onnxruntime and the twin get one self-contained model, never a path
        sha256 = model_sha256(data, files)
        del files
        data = onnx_model.SerializeToString()
    runner = OnnxRunner(data, onnx_model, sha256, target)
    runner.external_data = names
    if hint is not None and hint != runner.input_shape:
        raise ProbeError(
            f"Expected inputs of the model's shape {runner.input_shape}, but the probes have shape {hint}",
            field="probes",
        )
    return runner
