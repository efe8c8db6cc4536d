"""The gunicorn worker class of ``audit-service serve``: gunicorn's gevent worker, with

* a deadline on reading each request's line and headers (``AUDIT_HEADER_TIMEOUT_S``): a client that
  sends its headers slowly (slowloris) or not at all is disconnected when it is up; between requests
  on a kept-alive connection the same deadline applies to the wait for the next one;
* an idle timeout on every later socket read or write (``AUDIT_REQUEST_IDLE_S``): a body that stops
  arriving, or a client that stops reading the answer, frees its connection;
* gunicorn's own refusals (400, 414, 431...) answered as ``application/problem+json``.

Every connection is a greenlet, not a thread: slow clients and ``POST /audit?wait=`` waiters (a
cooperative ``time.sleep`` poll, see ``audits.submit_audit``) cost a little memory each, not a slot.
``GeventWorker.init_process`` monkey-patches the standard library before the app is imported, so
``time.sleep``, ``select``, ``subprocess`` and ``threading`` in ``jobs.launcher`` (the sandboxed model
check) yield to other greenlets while they wait; SQLite calls run briefly on the loop itself.
"""

from __future__ import annotations

import socket
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


class AuditWorker(GeventWorker):
    def init_process(self) -> None:
        settings = Settings.from_env()
        self.header_timeout = float(settings.header_timeout_s)
        self.idle_timeout = float(settings.request_idle_s)
        super().init_process()  # patches, loads the app, runs

    def timeout_ctx(self) -> gevent.Timeout:
        # gunicorn wraps each ``next(parser)`` (request line + headers) in this; False: end quietly
        return gevent.Timeout(self.header_timeout, False)

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        client.settimeout(self.idle_timeout)
        super(GeventWorker, self).handle(listener, client, addr)  # AsyncWorker.handle, without setblocking(1)

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
