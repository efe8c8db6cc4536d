"""Checks every model file passes before any runtime touches it (shared by ONNX and TorchScript).

The file is read once, under a size cap, and every later step works on those bytes (hash, format
sniffing, loading), so a file swapped on disk between the checks and the load cannot slip through.
The format is decided by content, never by the file name, and Python pickles are refused by their
magic bytes: nothing here, or anywhere in the runtime, unpickles a model file.
"""

from __future__ import annotations

import io
import math
import os
import zipfile
from pathlib import Path
from typing import Sequence

import onnx

from ..errors import ModelError, short_error  # short_error re-exported (the runners import it here)
from .base import ModelFormat

#: Default cap on the model file size; override with the environment variable below.
DEFAULT_MAX_BYTES = 200 * 1024 * 1024
MAX_BYTES_ENV = "AUDIT_MAX_MODEL_BYTES"
#: Cap on the elements of one input sample, checked before any batch is allocated.
MAX_INPUT_ELEMENTS = 50_000_000

_PICKLE_REFUSAL = (
    "Expected an ONNX model, a TorchScript archive (torch.jit.save) or a torch.export program "
    "(torch.export.save, .pt2), but got a Python pickle; pickles are never loaded, because unpickling "
    "runs arbitrary code. Export the model with torch.onnx.export, torch.export.save or torch.jit.save"
)
_CHECKPOINT_REFUSAL = (
    "Expected an ONNX model, a TorchScript archive (torch.jit.save) or a torch.export program "
    "(torch.export.save, .pt2), but got a torch.save checkpoint (a Python pickle inside a zip, no "
    "TorchScript code); pickles are never loaded, because unpickling runs arbitrary code. Export the "
    "model with torch.onnx.export, torch.export.save or torch.jit.save"
)


def max_model_bytes() -> int:
    """The size cap in force: ``AUDIT_MAX_MODEL_BYTES`` when set, else 200 MB."""
    raw = os.environ.get(MAX_BYTES_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_MAX_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise ModelError(
            f"Expected {MAX_BYTES_ENV} to be a positive integer (bytes), but got {raw!r}", field="model"
        ) from None
    if value <= 0:
        raise ModelError(f"Expected {MAX_BYTES_ENV} to be a positive integer (bytes), but got {raw!r}", field="model")
    return value


def read_model_bytes(source: str | Path | bytes, max_bytes: int | None = None) -> bytes:
    """The model file's bytes, refused with ``ModelError`` when missing, unreadable or over the cap.

    The size is checked on disk before reading, and again on what was read (the file may grow).
    """
    cap = max_model_bytes() if max_bytes is None else int(max_bytes)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        path = Path(source)
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise ModelError(f"Expected a model file, but {path} is not a regular file", field="model")
            if size > cap:
                raise ModelError(_too_big(size, cap), field="model")
            with path.open("rb") as fh:
                data = fh.read(cap + 1)
        except OSError as exc:
            raise ModelError(
                f"Expected a readable model file, but {path}: {exc.strerror or exc}", field="model"
            ) from None
    if len(data) > cap:
        raise ModelError(_too_big(len(data), cap), field="model")
    if not data:
        raise ModelError(
            "Expected an ONNX model, a TorchScript archive or a torch.export program, but the file is empty",
            field="model",
        )
    return data


def _too_big(size: int, cap: int) -> str:
    return (
        f"Expected a model file of at most {cap} bytes ({cap / 2**20:.1f} MiB), but got {size} bytes; "
        f"raise the cap with {MAX_BYTES_ENV} if this model is trusted to be that large"
    )


def is_pickle(data: bytes) -> bool:
    """True for pickle protocol 2-5 streams (opcode PROTO, then the protocol number).

    Protocol 0/1 pickles have no magic; they are caught later as "neither zip nor ONNX, ends in the
    pickle STOP opcode" (see ``identify``).
    """
    return len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5


def identify(data: bytes) -> tuple[ModelFormat, onnx.ModelProto | None]:
    """The file's format by content, with the parsed ONNX model when it is ONNX.

    Raises ``ModelError`` for pickles, ``torch.save`` checkpoints, and anything that is neither a
    TorchScript archive nor a parseable ONNX protobuf. Nothing is unpickled or executed.
    """
    if is_pickle(data):
        raise ModelError(_PICKLE_REFUSAL, field="model")
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return _identify_zip(data), None
    model = parse_onnx(data)
    return "onnx", model


def _identify_zip(data: bytes) -> ModelFormat:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            if is_pt2_archive(names, archive.read):
                return "pt2"
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ModelError(
            f"Expected a TorchScript archive or torch.export program (zip), but the zip is damaged: {exc}",
            field="model",
        ) from None
    has_code = any("/code/" in f"/{name}" for name in names)
    has_constants = any(name == "constants.pkl" or name.endswith("/constants.pkl") for name in names)
    if has_code or has_constants:
        return "torchscript"
    if any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
        raise ModelError(_CHECKPOINT_REFUSAL, field="model")
    raise ModelError(
        "Expected an ONNX model, a TorchScript archive (torch.jit.save) or a torch.export program "
        "(torch.export.save), but got a zip "
        "archive with neither TorchScript code (code/, constants.pkl) nor a pt2 archive_format",
        field="model",
    )


def is_pt2_archive(names: list[str], read) -> bool:
    """True for a zip whose ``<root>/archive_format`` member says ``pt2`` (``torch.export.save``)."""
    for name in names:
        if name.rsplit("/", 1)[-1] == "archive_format" and name.count("/") <= 1:
            try:
                return read(name).strip() == b"pt2"
            except Exception:  # noqa: BLE001 - a damaged member: not an archive we can read
                return False
    return False


def parse_onnx(data: bytes) -> onnx.ModelProto:
    """Parse ONNX protobuf bytes; never follows external-data references (those are refused later)."""
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning-ish and friends
        raise ModelError(_not_onnx(data, f"the protobuf does not decode ({short_error(exc)})"), field="model") from None
    if not model.HasField("graph") or model.ir_version <= 0 or len(model.graph.node) == 0:
        raise ModelError(
            _not_onnx(data, "it decodes but holds no ONNX graph (truncated or not a model?)"), field="model"
        )
    return model


def _not_onnx(data: bytes, why: str) -> str:
    if data[:1] != b"\x08" and data.rstrip()[-1:] == b".":
        # The pickle STOP opcode ends every pickle, protocol 0 and 1 included; ONNX files start
        # with the ir_version tag 0x08.
        return _PICKLE_REFUSAL
    return (
        f"Expected an ONNX model or a TorchScript archive (torch.jit.save), but the file could not be "
        f"parsed as ONNX: {why}, and it is not a zip archive"
    )


def check_input_shape(shape: Sequence[object], source: str) -> tuple[int, ...]:
    """A per-sample input shape: concrete positive ints whose product stays under the element cap."""
    dims: list[int] = []
    for i, dim in enumerate(shape):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ModelError(
                f"Expected positive integer input sizes, but {source} gives {dim!r} for "
                f"dimension {i + 1} of the sample shape {list(shape)}",
                field="model",
            )
        dims.append(dim)
    if not dims:
        raise ModelError(
            f"Expected at least one input dimension besides the batch, but {source} gives none", field="model"
        )
    elements = math.prod(dims)
    if elements > MAX_INPUT_ELEMENTS:
        raise ModelError(
            f"Expected at most {MAX_INPUT_ELEMENTS} input elements per sample, but {source} "
            f"gives {tuple(dims)} = {elements}",
            field="model",
        )
    return tuple(dims)
