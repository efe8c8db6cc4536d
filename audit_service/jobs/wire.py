"""The cage's wire format: one JSON header and raw tensor bytes per message, over a stream socket.

Why not pickle or ``torch.save``: the other side may be hostile, and both unpickle code. A message is a
4-byte big-endian length, a UTF-8 JSON header (at most ``MAX_HEADER_BYTES``) with a ``tensors`` list of
``{"dtype", "shape"}``, then each tensor's bytes in C order. The reader names the largest payload it is
willing to take before it allocates anything, so a peer cannot make it read or allocate without bound.
"""

from __future__ import annotations

import json
import math
import socket
import struct
from typing import Any, Sequence

import torch

MAX_HEADER_BYTES = 1 << 20
_LENGTH = struct.Struct("!I")
#: the only element types that cross the boundary
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16, "int64": torch.int64}
_NAMES = {v: k for k, v in DTYPES.items()}


class WireError(ConnectionError):
    """The peer closed the channel or sent something outside the format."""


def send(sock: socket.socket, header: dict, tensors: Sequence[torch.Tensor] = ()) -> None:
    """Write one message: ``header`` (JSON-serialisable) and ``tensors`` (moved to the CPU, contiguous)."""
    payload = [t.detach().to("cpu").contiguous() for t in tensors]
    for t in payload:
        if t.dtype not in _NAMES:
            raise TypeError(f"Expected a tensor of {sorted(DTYPES)}, but got {t.dtype}")
    meta = [{"dtype": _NAMES[t.dtype], "shape": list(t.shape)} for t in payload]
    text = json.dumps({**header, "tensors": meta}, allow_nan=False).encode()
    if len(text) > MAX_HEADER_BYTES:
        raise ValueError(f"message header of {len(text)} bytes is over {MAX_HEADER_BYTES}")
    sock.sendall(_LENGTH.pack(len(text)) + text)
    for t in payload:
        if t.numel():
            sock.sendall(t.reshape(-1).view(torch.uint8).numpy())


def receive(sock: socket.socket, max_tensor_bytes: int) -> tuple[dict, list[torch.Tensor]]:
    """Read one message; ``WireError`` for anything malformed or past ``max_tensor_bytes`` in all."""
    (size,) = _LENGTH.unpack(_read_exact(sock, _LENGTH.size))
    if size > MAX_HEADER_BYTES:
        raise WireError(f"the peer announced a header of {size} bytes (limit {MAX_HEADER_BYTES})")
    try:
        header = json.loads(_read_exact(sock, size))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"the peer sent a header that is not JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("tensors", []), list):
        raise WireError("the peer sent a header that is not a JSON object with a tensors list")
    specs = [_tensor_spec(m) for m in header.pop("tensors", [])]
    total = sum(math.prod(shape) * DTYPES[dtype].itemsize for dtype, shape in specs)
    if total > max_tensor_bytes:
        raise WireError(f"the peer announced {total} bytes of tensors (limit {max_tensor_bytes})")
    tensors = []
    for dtype, shape in specs:
        raw = torch.empty(math.prod(shape) * DTYPES[dtype].itemsize, dtype=torch.uint8)
        if raw.numel():
            _read_into(sock, memoryview(raw.numpy()))
        tensors.append(raw.view(DTYPES[dtype]).reshape(shape))
    return header, tensors


def _tensor_spec(meta: Any) -> tuple[str, tuple[int, ...]]:
    if not isinstance(meta, dict) or meta.get("dtype") not in DTYPES or not isinstance(meta.get("shape"), list):
        raise WireError(f"the peer described a tensor as {str(meta)[:100]}")
    shape = meta["shape"]
    if len(shape) > 8 or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape):
        raise WireError(f"the peer described a tensor of shape {str(shape)[:100]}")
    return meta["dtype"], tuple(shape)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _read_into(sock, memoryview(buf))
    return bytes(buf)


def _read_into(sock: socket.socket, view: memoryview) -> None:
    view = view.cast("B")
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], min(len(view) - got, 1 << 22))
        if n == 0:
            raise WireError("the peer closed the channel")
        got += n
