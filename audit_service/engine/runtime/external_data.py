"""ONNX external data: tensors whose bytes live in files beside the graph, read safely into the graph.

``torch.onnx.export`` (the dynamo exporter, torch 2.9+) writes the weights of ``m.onnx`` to ``m.onnx.data``;
``mlflow.onnx.log_model`` and ``onnx.save_model(..., save_as_external_data=True)`` do the same. Each such
tensor names a ``location`` (and an ``offset`` and ``length`` in it). The rules, checked before a byte is
read:

* a location is a **plain file name** in the model file's own folder (``external_names``): no absolute
  path, no ``..``, no path separator (no subfolders), no control character, at most 255 bytes; the folder is the one of
  the path the model was loaded from (not resolved through links: the service links a model and its data
  files side by side into a folder of their own);
* the file is a regular file (opened without blocking, so a FIFO or a device is refused, not read);
* every tensor's ``offset`` + ``length`` lies inside its file, and the length is the tensor's own size;
* the graph plus every referenced file stays under the model size cap (``max_model_bytes``), and under
  protobuf's 2 GiB limit once merged.

Anything else is a ``ModelError`` naming the tensor and the location. The bytes are then copied into the
tensors (``raw_data``) and the references removed, so onnxruntime and the onnx2torch twin see one
self-contained model built from bytes, never a path: nothing can make them open another file.

``model_sha256`` is the model's identity in reports and the service: ``sha256(graph)`` for a self-contained
file (unchanged), and for a graph with external data ``sha256("onnx-external-data-v1\\0" + sha256(graph) +
for each data file, sorted by name: name "\\0" size "\\0" sha256(file))``. ``model_files_sha256`` computes
the same from files on disk (the service's engine hashes the staged files it was given).
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import stat
from pathlib import Path
from typing import Iterable, Mapping

import onnx
from onnx import TensorProto

from ..errors import ModelError
from ..external_names import location_problem
from .onnx_graph import is_external, model_tensors
from .validation import MAX_BYTES_ENV

#: protobuf refuses to serialize a message of 2 GiB or more; the merged model must stay under it
PROTOBUF_LIMIT = (1 << 31) - 1
_KEYS = ("location", "offset", "length", "checksum")
_DIGITS = re.compile(r"[0-9]{1,19}")
_DOMAIN = b"onnx-external-data-v1\x00"
_SUB_BYTE = {TensorProto.INT4, TensorProto.UINT4, getattr(TensorProto, "FLOAT4E2M1", -1)}
#: the old refusal's advice, still the way to a self-contained file
SELF_CONTAINED = "re-save it self-contained with onnx.save_model(model, path, save_as_external_data=False)"
RESAVE_HINT = f"keep each data file beside the .onnx under the name the graph gives it, or {SELF_CONTAINED}"


def check_location(location: str, label: str) -> str:
    """``location`` when it is a plain file name (``external_names``), else a ``ModelError`` naming it."""
    why = location_problem(location)
    if why is not None:
        raise ModelError(
            f"Expected the external data of {label} to be a plain file name in the model's own "
            f"folder, but its location {location[:300]!r} {why}; external data is read only from files "
            f"beside the model. Re-save with onnx.save_model(model, path, save_as_external_data=True, "
            f"location='model.onnx.data'), or {SELF_CONTAINED}",
            field="model",
        )
    return location


def _reference(label: str, tensor: TensorProto) -> tuple[str, int, int | None]:
    """(location, offset, length or None) of one external tensor, every entry checked."""
    entries: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key not in _KEYS:
            raise ModelError(
                f"Expected the external data of {label} to name only {', '.join(_KEYS)}, but it "
                f"names {entry.key[:60]!r}; only a plain file name beside the model is followed",
                field="model",
            )
        if entry.key in entries:
            raise ModelError(
                f"Expected the external data of {label} to name its {entry.key} once, but it names it twice",
                field="model",
            )
        entries[entry.key] = entry.value
    location = entries.get("location", "")
    if tensor.data_location != TensorProto.EXTERNAL:
        raise ModelError(
            f"Expected {label} to be stored either in the file or externally (data_location "
            f"EXTERNAL), but it has external data entries (location {location[:200]!r}) without "
            f"data_location EXTERNAL",
            field="model",
        )
    if not location:
        raise ModelError(
            f"Expected the external data of {label} to name a location (a file beside the model), but it names none",
            field="model",
        )
    check_location(location, label)
    numbers: dict[str, int] = {}
    for key in ("offset", "length"):
        if key in entries:
            if not _DIGITS.fullmatch(entries[key]):
                raise ModelError(
                    f"Expected the {key} of {label}'s external data in {location!r} to be a "
                    f"non-negative integer, but got {entries[key][:40]!r}",
                    field="model",
                )
            numbers[key] = int(entries[key])
    return location, numbers.get("offset", 0), numbers.get("length")


def _tensor_bytes(label: str, tensor: TensorProto, location: str) -> int:
    """The bytes the tensor's type and dims need (what its external slice must hold)."""
    if tensor.data_type in (TensorProto.UNDEFINED, TensorProto.STRING):
        kind = TensorProto.DataType.Name(tensor.data_type)
        raise ModelError(
            f"Expected {label} with external data (in {location!r}) to have a numeric type, but it is {kind}",
            field="model",
        )
    if any(d < 0 for d in tensor.dims):
        raise ModelError(f"Expected {label} to have non-negative dims, but got {list(tensor.dims)}", field="model")
    count = math.prod(tensor.dims)
    if tensor.data_type in _SUB_BYTE:
        return (count + 1) // 2
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        raise ModelError(
            f"Expected {label} with external data to have a known element type, but its type is {tensor.data_type}",
            field="model",
        ) from None
    return count * itemsize


def external_references(model: onnx.ModelProto) -> dict[str, list[tuple[str, TensorProto, int, int | None]]]:
    """{location: [(label, tensor, offset, length or None)]} of every tensor stored externally, each
    reference checked (plain name, known keys, integer offset and length); {} for a self-contained model."""
    found: dict[str, list[tuple[str, TensorProto, int, int | None]]] = {}
    for label, tensor in model_tensors(model):
        if is_external(tensor):
            location, offset, length = _reference(label, tensor)
            found.setdefault(location, []).append((label, tensor, offset, length))
    return found


def external_data_names(model: onnx.ModelProto) -> list[str]:
    """The data files the graph names (sorted), each checked to be a plain file name."""
    return sorted(external_references(model))


def _too_big(cap: int, graph_bytes: int, total: int, location: str) -> ModelError:
    return ModelError(
        f"Expected a model of at most {cap} bytes ({cap / 2**20:.1f} MiB) with its external data, "
        f"but the graph ({graph_bytes} bytes) and its data files come to at least {total} bytes by "
        f"{location!r}; raise the cap with {MAX_BYTES_ENV} if this model is trusted to be that large",
        field="model",
    )


def _read_data_file(
    folder: Path, location: str, label: str, room: int, cap: int, graph_bytes: int, total: int
) -> bytes:
    """The whole regular file ``folder/location`` when it fits in ``room`` bytes."""
    path = folder / location
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ModelError(
            f"Expected the external data file {location!r} of {label} beside the model (in its "
            f"own folder), but there is no such file; {RESAVE_HINT} (the service takes each data file "
            f"as a `model_data` part named by its location)",
            field="model",
        ) from None
    except OSError as exc:
        reason = "permission denied" if exc.errno in (errno.EACCES, errno.EPERM) else (exc.strerror or str(exc))
        raise ModelError(
            f"Expected a readable external data file {location!r} of {label} beside the model, but "
            f"it cannot be opened ({reason})",
            field="model",
        ) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ModelError(
            f"Expected the external data {location!r} of {label} to be a regular file beside the "
            f"model, but it is not (a folder, device or pipe)",
            field="model",
        )
    with os.fdopen(fd, "rb") as fh:
        if info.st_size > room:
            raise _too_big(cap, graph_bytes, total + info.st_size, location)
        data = fh.read(room + 1)
    if len(data) > room:
        raise _too_big(cap, graph_bytes, total + len(data), location)
    return data


def load_external_data(
    model: onnx.ModelProto, folder: str | Path | None, graph_bytes: int, max_bytes: int
) -> dict[str, bytes]:
    """Read every data file the graph names from ``folder`` (the model file's own folder) into its tensors
    (``raw_data``), leaving a self-contained model; returns {location: file bytes} for ``model_sha256``
    ({} when the graph names none). ``ModelError`` naming the tensor and the location for anything the
    module's rules refuse; ``folder`` None (a model given as bytes) refuses any reference."""
    references = external_references(model)
    if not references:
        return {}
    if folder is None:
        location, entries = next(iter(sorted(references.items())))
        raise ModelError(
            f"Expected a self-contained ONNX model when it is given as bytes, but {entries[0][0]} "
            f"stores its data externally (in {location!r}); load it from its file, with the data "
            f"files beside it, or {SELF_CONTAINED}",
            field="model",
        )
    folder = Path(folder)
    files: dict[str, bytes] = {}
    total = graph_bytes
    for location in sorted(references):
        label = references[location][0][0]
        data = _read_data_file(folder, location, label, max_bytes - total, max_bytes, graph_bytes, total)
        total += len(data)
        files[location] = data
    merged = graph_bytes + sum(
        _tensor_bytes(label, tensor, location)
        for location, entries in references.items()
        for label, tensor, _, _ in entries
    )
    if merged > PROTOBUF_LIMIT:
        raise ModelError(
            f"Expected a model under 2 GiB once its external data is read into it (protobuf's limit), "
            f"but it would be {merged} bytes; models that large cannot be audited here",
            field="model",
        )
    for location, entries in references.items():
        data = files[location]
        for label, tensor, offset, length in entries:
            need = _tensor_bytes(label, tensor, location)
            if length is not None and length != need:
                raise ModelError(
                    f"Expected the external data of {label} in {location!r} to be {need} bytes (its "
                    f"type and dims {list(tensor.dims)}), but its length is {length}",
                    field="model",
                )
            if offset + need > len(data):
                raise ModelError(
                    f"Expected the external data of {label} to lie inside {location!r} ({len(data)} "
                    f"bytes), but offset {offset} + length {need} runs past its end",
                    field="model",
                )
            for name in ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data"):
                tensor.ClearField(name)
            tensor.raw_data = data[offset : offset + need]
            del tensor.external_data[:]
            tensor.data_location = TensorProto.DEFAULT
    return files


# ----------------------------------------------------------------------------- identity
def _combined(graph_digest: bytes, parts: Iterable[tuple[str, int, bytes]]) -> str:
    digest = hashlib.sha256(_DOMAIN)
    digest.update(graph_digest)
    for name, size, part in sorted(parts):
        digest.update(name.encode("utf-8", "surrogateescape") + b"\x00" + str(size).encode() + b"\x00" + part)
    return digest.hexdigest()


def model_sha256(graph: bytes, data: Mapping[str, bytes] | None = None) -> str:
    """The model's identity: ``sha256(graph)`` without external data, else the combined digest (module doc)."""
    if not data:
        return hashlib.sha256(graph).hexdigest()
    return _combined(
        hashlib.sha256(graph).digest(),
        ((name, len(part), hashlib.sha256(part).digest()) for name, part in data.items()),
    )


def model_files_sha256(
    path: str | Path, data: Mapping[str, str | Path] | None = None, max_bytes: int | None = None
) -> tuple[str, bytes]:
    """``model_sha256`` of a model file and its data files {location: path}, streamed, and the file's first two
    bytes (its magic); ``ModelError`` when the files together exceed ``max_bytes``."""
    seen = 0

    def stream(file: str | Path, what: str) -> tuple[bytes, int, bytes]:
        nonlocal seen
        digest, head, size = hashlib.sha256(), b"", 0
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 20):
                head = head or chunk[:2]
                size += len(chunk)
                seen += len(chunk)
                if max_bytes is not None and seen > max_bytes:
                    if not data:
                        raise ModelError(
                            f"Expected a model file of at most {max_bytes} bytes, but it is larger", field="model"
                        )
                    raise ModelError(
                        f"Expected a model of at most {max_bytes} bytes with its external data, but "
                        f"it is larger by {what}",
                        field="model",
                    )
                digest.update(chunk)
        return digest.digest(), size, head

    graph_digest, _, magic = stream(path, "the graph")
    if not data:
        return graph_digest.hex(), magic
    parts = []
    for name in sorted(data):
        check_location(name, f"the data file {name!r}")
        part, size, _ = stream(data[name], repr(name))
        parts.append((name, size, part))
    return _combined(graph_digest, parts), magic
