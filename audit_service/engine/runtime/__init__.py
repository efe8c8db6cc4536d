"""Model runtimes: ONNX (onnxruntime), TorchScript and torch.export (.pt2) behind one ``ModelRunner`` protocol.

``load_model`` is the front door; it checks the file (size cap, format by content, pickles refused
unread, ONNX external data only as plain file names beside the model) and returns a runner that
computes logits in batches on its device and offers a differentiable ``torch_module()`` for gradient metrics, or says why it cannot.
"""

from .base import ModelFormat, ModelRunner
from .external_data import model_files_sha256, model_sha256
from .loader import load_model, resolve_device, sniff_format
from .validation import DEFAULT_MAX_BYTES, MAX_INPUT_ELEMENTS

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_INPUT_ELEMENTS",
    "ModelFormat",
    "ModelRunner",
    "load_model",
    "model_files_sha256",
    "model_sha256",
    "resolve_device",
    "sniff_format",
]
