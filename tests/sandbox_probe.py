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


def network_probe(model, spec, **_kwargs) -> dict:  # noqa: ANN001
    port = int(os.environ["PROBE_PORT"])
    import subprocess

    return {
        "python_connect": _attempt(lambda: socket.create_connection(("127.0.0.1", port), timeout=2).close()),
        "python_dns": _attempt(lambda: socket.getaddrinfo("example.com", 80)),
        "subprocess": _attempt(lambda: subprocess.run(["true"], check=True)),
        "native_connect": _native_connect(port),
        "netns": os.environ.get("AUDIT_SANDBOX_NETNS_ACTIVE", "?"),
    }
