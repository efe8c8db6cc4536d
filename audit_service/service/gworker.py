"""The gunicorn worker class of ``audit-service serve``: gunicorn's gevent worker, with

* a deadline on reading each request's line and headers (``AUDIT_HEADER_TIMEOUT_S``): a client that
  sends its headers slowly (slowloris) or not at all is disconnected when it is up; between requests
  on a kept-alive connection the same deadline applies to the wait for the next one;
* an idle timeout on every later socket read or write (``AUDIT_REQUEST_IDLE_S``): a body that stops
  arriving, or a client that stops reading the answer, frees its connection;
* gunicorn's own refusals (400, 414, 431...) answered as ``application/problem+json``;
* at most ``AUDIT_MAX_CLIENT_CONNECTIONS`` connections per client address in each web worker: past it, a new
  connection closes that address's longest-idle kept-alive one (waiting for its next request), or is itself
  closed when every one of them is busy; one address's idle connections cannot crowd out other clients, and
  its own fresh request still gets through.

Every connection is a greenlet, not a thread: slow clients and ``POST /audit?wait=`` waiters (a
cooperative ``time.sleep`` poll, see ``audits.submit_audit``) cost a little memory each, not a slot.
``GeventWorker.init_process`` monkey-patches the standard library before the app is imported, so
``time.sleep``, ``select``, ``subprocess`` and ``threading`` in ``jobs.launcher`` (the sandboxed model
check) yield to other greenlets while they wait; SQLite calls run briefly on the loop itself.
"""

from __future__ import annotations

import socket
import time
from collections import defaultdict
from typing import Any

import gevent
from gunicorn import util
from gunicorn.workers.ggevent import GeventWorker

from ..jobs.settings import Settings
from .edge import error_detail, problem_bytes


class _Capture:
    """Stands in for the client socket while gunicorn's ``handle_error`` writes its HTML answer, so that
    its choice of status (and its logging) is kept and only the body is replaced."""

    def __init__(self, client: Any) -> None:
        self._client, self.data = client, b""

    def gettimeout(self) -> float:
        return 0.0

    def sendall(self, data: bytes) -> None:
        self.data += data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class _Connection:
    """One client connection of this worker: idle (``idle_since``) while it waits for a request's headers."""

    __slots__ = ("client", "idle_since")

    def __init__(self, client: Any) -> None:
        self.client, self.idle_since = client, time.monotonic()


class ClientConnections:
    """The connections of each client address in one web worker, and the cap on them."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.by_address: dict[str, dict[Any, _Connection]] = defaultdict(dict)
        self.evicted = self.refused = 0

    def admit(self, address: str, key: Any, client: Any) -> bool:
        """Register a new connection; at the cap, close the address's longest-idle one first, or say False
        (refuse the new one) when all are busy."""
        mine = self.by_address[address]
        if self.cap > 0 and len(mine) >= self.cap:
            idle = [(c.idle_since, k) for k, c in mine.items() if c.idle_since is not None]
            if not idle:
                self.refused += 1
                return False
            oldest = mine.pop(min(idle, key=lambda pair: pair[0])[1])
            oldest.idle_since = None
            self.evicted += 1
            # the system call alone (gevent's own shutdown would raise in the waiting greenlet, which gunicorn
            # logs as a socket error): that greenlet reads end-of-file and ends the connection quietly
            raw = getattr(oldest.client, "_sock", oldest.client)
            try:
                raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        mine[key] = _Connection(client)
        return True

    def mark(self, address: str, key: Any, idle: bool) -> None:
        conn = self.by_address.get(address, {}).get(key)
        if conn is not None:
            conn.idle_since = time.monotonic() if idle else None

    def forget(self, address: str, key: Any) -> None:
        mine = self.by_address.get(address)
        if mine is not None:
            mine.pop(key, None)
            if not mine:
                del self.by_address[address]


def _address(addr: Any) -> str:
    return str(addr[0]) if isinstance(addr, (tuple, list)) and addr else str(addr)


class AuditWorker(GeventWorker):
    def init_process(self) -> None:
        settings = Settings.from_env()
        self.header_timeout = float(settings.header_timeout_s)
        self.idle_timeout = float(settings.request_idle_s)
        self.connections = ClientConnections(int(settings.max_client_connections))
        self.addresses: dict[Any, str] = {}  # greenlet -> its client's address
        super().init_process()  # patches, loads the app, runs

    def timeout_ctx(self) -> gevent.Timeout:
        # gunicorn wraps each ``next(parser)`` (request line + headers) in this; False: end quietly.
        # From here until the headers arrive the connection is idle: the first a full address gives up
        current = gevent.getcurrent()
        address = self.addresses.get(current)
        if address is not None:
            self.connections.mark(address, current, idle=True)
        return gevent.Timeout(self.header_timeout, False)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        self.connections.mark(_address(addr), gevent.getcurrent(), idle=False)
        return super().handle_request(listener_name, req, sock, addr)

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        client.settimeout(self.idle_timeout)
        address, current = _address(addr), gevent.getcurrent()
        if not self.connections.admit(address, current, client):
            util.close(client)  # every connection of this address is mid-request: this one waits its turn elsewhere
            return
        self.addresses[current] = address
        try:
            super(GeventWorker, self).handle(listener, client, addr)  # AsyncWorker.handle, without setblocking(1)
        finally:
            self.addresses.pop(current, None)
            self.connections.forget(address, current)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        capture = _Capture(client)
        super().handle_error(req, capture, addr, exc)
        status_line = capture.data.split(b"\r\n", 1)[0].decode("latin1").split(" ", 2)
        if len(status_line) < 3 or not status_line[1].isdigit():
            return
        status, reason = int(status_line[1]), status_line[2]
        try:
            util.write_nonblock(client, problem_bytes(status, reason, error_detail(status, exc, self.cfg)))
            _lingering_close(client)
        except Exception:  # noqa: BLE001 - the client is gone
            self.log.debug("failed to send the error answer")


#: after an error answer, read (and drop) what the client still sends for at most this long / this much
LINGER_S, LINGER_BYTES = 1.0, 1024 * 1024


def _lingering_close(client: Any) -> None:
    """Half-close, then drain the rest of the request before the caller closes the socket: closing it with
    unread bytes (the rest of a 10 kB request line) sends a TCP reset, which may destroy the answer
    before the client has read it."""
    client.shutdown(socket.SHUT_WR)
    drained = 0
    with gevent.Timeout(LINGER_S, False):
        while drained < LINGER_BYTES:
            chunk = client.recv(65536)
            if not chunk:
                break
            drained += len(chunk)
