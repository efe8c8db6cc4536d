"""An "engine" for the sandbox tests: tries to reach the network and start programs from inside the
sandbox and reports what happened (imported by ``jobs.sandbox`` through ``task.json``'s ``engine``)."""

from __future__ import annotations

import ctypes
import os
import socket
import struct


def _attempt(fn) -> str:  # noqa: ANN001
    try:
        fn()
        return "connected"
    except Exception as exc:  # noqa: BLE001
        return f"refused: {type(exc).__name__}: {exc}"


def _native_connect(port: int) -> str:
    """connect() through the C library, as native model code would: no Python audit event fires."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.socket(2, 1, 0)  # AF_INET, SOCK_STREAM
    if fd < 0:
        return f"socket failed: errno {ctypes.get_errno()}"
    addr = struct.pack("=HH4s8x", 2, socket.htons(port), socket.inet_aton("127.0.0.1"))
    rc = libc.connect(fd, ctypes.c_char_p(addr), len(addr))
    errno = ctypes.get_errno()
    libc.close(fd)
    return "connected" if rc == 0 else f"failed: errno {errno} ({os.strerror(errno)})"


def network_probe(request, **_kwargs) -> dict:  # noqa: ANN001
    port = int(os.environ["PROBE_PORT"])
    import subprocess

    return {
        "python_connect": _attempt(lambda: socket.create_connection(("127.0.0.1", port), timeout=2).close()),
        "python_dns": _attempt(lambda: socket.getaddrinfo("example.com", 80)),
        "subprocess": _attempt(lambda: subprocess.run(["true"], check=True)),
        "native_connect": _native_connect(port),
        "netns": os.environ.get("AUDIT_SANDBOX_NETNS_ACTIVE", "?"),
    }


def _try_read(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            data = fh.read(64)
        return f"read {len(data)} bytes"
    except OSError as exc:
        return f"refused: errno {exc.errno} ({exc.strerror})"


def _try_write(path: str) -> str:
    try:
        with open(path, "ab") as fh:
            fh.write(b"written by the sandbox\n")
        return "written"
    except OSError as exc:
        return f"refused: errno {exc.errno} ({exc.strerror})"


def _try_from_file(path: str, shared: bool) -> str:
    import torch

    try:
        t = torch.from_file(path, shared=shared, size=16, dtype=torch.uint8)
        return f"{'mapped' if shared else 'read'} {t.numel()} bytes"
    except Exception as exc:  # noqa: BLE001
        return f"refused: {type(exc).__name__}: {str(exc)[:200]}"


def _try_unix_connect(path: str) -> str:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
        return "connected"
    except OSError as exc:
        return f"refused: {type(exc).__name__}: {exc}"


def _try_signal(pid: int) -> str:
    import signal

    try:
        os.kill(pid, signal.SIGCONT)  # harmless if delivered; refused when signals are scoped
        return "delivered"
    except OSError as exc:
        return f"refused: errno {exc.errno} ({exc.strerror})"


def file_probe(request, **_kwargs) -> dict:  # noqa: ANN001
    """Tries, from inside the cage, every file access in ``PROBE_FILES`` (a JSON object
    ``{"read": [...], "write": [...], "from_file": [...], "from_file_shared": [...], "unix": [...]}``)."""
    import json

    asked = json.loads(os.environ["PROBE_FILES"])
    return {
        "read": {p: _try_read(p) for p in asked.get("read", [])},
        "write": {p: _try_write(p) for p in asked.get("write", [])},
        "from_file": {p: _try_from_file(p, False) for p in asked.get("from_file", [])},
        "from_file_shared": {p: _try_from_file(p, True) for p in asked.get("from_file_shared", [])},
        "unix": {p: _try_unix_connect(p) for p in asked.get("unix", [])},
        "signal_parent": _try_signal(os.getppid()),
        "confinement": json.loads(os.environ.get("AUDIT_SANDBOX_CONFINEMENT", "{}")),
    }


def env_probe(request, **_kwargs) -> dict:  # noqa: ANN001
    """The names of the variables the sandbox sees."""
    return {"names": sorted(os.environ)}


def _fds(pid: str) -> dict:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError as exc:
            out[fd] = f"unreadable: {exc}"
    return out


def cage_fd_probe(request, **_kwargs) -> dict:  # noqa: ANN001
    """The descriptors of the cage holding the request's model (loaded through its ``load``) and of the engine."""
    runner = request.load(request.model, device="cpu")
    return {"cage": _fds(str(runner.cage.pid)), "engine": _fds("self")}
