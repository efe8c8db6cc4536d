"""Uploaded files: stream into the blob store under a per-file cap, then check what they are.

Models are validated with ``runtime.load_model`` before a job is queued (a file that does not load
is a 422 at submission). Probe files are checked by their ``.npy`` / ``.npz`` headers only — no
array is read and nothing is unpickled here; the sandbox loads them.
"""

from __future__ import annotations

import threading
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from werkzeug.datastructures import FileStorage

from ..jobs.blobs import BlobStore, BlobTooLarge
from .errors import PayloadTooLarge, Unprocessable

MiB = 1024 * 1024
_VALIDATED: "OrderedDict[str, dict]" = OrderedDict()
_VALIDATED_LOCK = threading.Lock()


def save_upload(blobs: BlobStore, upload: FileStorage, field: str, max_mb: int) -> dict:
    try:
        sha, size = blobs.put_stream(upload.stream, max_bytes=max_mb * MiB)
    except BlobTooLarge:
        raise PayloadTooLarge(f"Expected `{field}` to be at most {max_mb} MiB, but the upload is larger "
                              f"(AUDIT_MAX_{'MODEL' if field == 'model' else 'PROBES'}_MB)", field=field) from None
    if size == 0:
        raise Unprocessable(f"Expected a non-empty `{field}` file, but got 0 bytes", field=field)
    name = Path(upload.filename or "").name[:255] or None
    return {"sha256": sha, "size_bytes": size, "filename": name}


def validate_model(path: Path, entry: dict, max_mb: int, input_shape: tuple[int, ...] | None = None) -> dict:
    """Load the model once (cached by sha256 and shape); fill ``format``; raise 422 when it does not load."""
    sha = (entry["sha256"], input_shape)
    with _VALIDATED_LOCK:
        info = _VALIDATED.get(sha)
    if info is None:
        try:
            from ..runtime import load_model
        except ImportError as exc:  # the runtime layer is not installed
            raise Unprocessable(f"model runtimes are unavailable in this installation ({exc})", field="model") from None
        from ..errors import AuditError

        try:
            runner = load_model(path, device="cpu", max_bytes=max_mb * MiB, input_shape=input_shape)
        except AuditError as exc:
            field = exc.field if exc.field and exc.field != "model" else "model"
            raise Unprocessable(exc.message if field != "model" else
                                f"Expected a loadable ONNX or TorchScript classifier, but {exc.message}",
                                field=field) from None
        except Exception as exc:  # noqa: BLE001 - any parser failure is the file's fault
            raise Unprocessable(f"Expected a loadable ONNX or TorchScript classifier, but loading failed with "
                                f"{type(exc).__name__}: {str(exc)[:300]}", field="model") from None
        info = {"format": str(getattr(runner, "format", "") or "") or None,
                "input_shape": list(getattr(runner, "input_shape", ()) or ()),
                "num_classes": getattr(runner, "num_classes", None)}
        with _VALIDATED_LOCK:
            _VALIDATED[sha] = info
            while len(_VALIDATED) > 256:
                _VALIDATED.popitem(last=False)
    return {**entry, "format": info["format"]}


def array_kind(path: Path, field: str) -> tuple[str, tuple[int, ...] | None]:
    """(``npy`` | ``npz``, shape of the probe array) from the file's headers; 422 when neither parses."""
    with open(path, "rb") as fh:
        head = fh.read(6)
    if head == b"\x93NUMPY":
        with open(path, "rb") as fh:
            return "npy", _read_npy_header(fh, field)
    if head[:2] == b"PK":
        shapes: dict[str, tuple[int, ...]] = {}
        try:
            with zipfile.ZipFile(path) as zf:
                members = [m for m in zf.infolist() if m.filename.endswith(".npy")]
                if not members:
                    raise Unprocessable(f"Expected `{field}` .npz to hold .npy arrays, but it holds none", field=field)
                for m in members:
                    with zf.open(m) as fh:
                        shapes[m.filename[:-4]] = _read_npy_header(fh, field)
        except zipfile.BadZipFile as exc:
            raise Unprocessable(f"Expected `{field}` to be a .npz archive, but {exc}", field=field) from None
        key = next((k for k in ("x", "probes", "X") if k in shapes), None)
        return "npz", shapes.get(key) if key else None
    raise Unprocessable(f"Expected `{field}` to be a NumPy .npy or .npz file, but its first bytes are {head!r}",
                        field=field)


def _read_npy_header(fh: Any, field: str) -> tuple[int, ...]:
    try:
        version = np.lib.format.read_magic(fh)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _fortran, dtype = reader(fh, max_header_size=100_000)
    except Exception as exc:  # noqa: BLE001
        raise Unprocessable(f"Expected `{field}` to hold valid .npy arrays, but the header does not parse: {exc}",
                            field=field) from None
    if dtype.hasobject:
        raise Unprocessable(f"Expected `{field}` to hold numeric arrays, but it holds Python objects "
                            f"(which the service never unpickles)", field=field)
    return tuple(int(d) for d in shape)
