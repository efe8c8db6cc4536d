"""What gunicorn itself does in front of the Flask app: its log lines without secrets, its own error
answers as ``application/problem+json``.

* ``redact(text)`` hides the value of every query parameter but the API's own harmless ones
  (``HARMLESS_PARAMS``: an allow-list, so ``%74oken=``, ``auth=`` or ``bearer=`` are hidden too);
  ``RedactingLogger`` (gunicorn ``logger_class``) applies it to every access-log atom and every
  error-log line, so a credential sent in a URL never reaches a log file.
* ``problem_bytes(...)`` is the raw HTTP answer ``gworker.AuditWorker`` sends for requests gunicorn
  refuses before the app sees them (400 bad request line, 414 line too long, 431 too many / too
  large headers).

This module imports no gevent: the gunicorn master loads the logger class too.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any
from urllib.parse import unquote

from gunicorn import glogging

from .errors import PROBLEM_BASE, PROBLEM_MIME

#: the only query parameters whose values reach a log: the API's own (``openapi.yaml``), none of them secret
HARMLESS_PARAMS = frozenset({"wait", "limit", "offset", "status"})
_PARAM = re.compile(r"([?&;])([^=&;\s?#'\"]*)=([^&;\s'\"#]*)")
REDACTED = "[REDACTED]"
#: the longest detail taken from a gunicorn parse error (it may quote what the client sent)
MAX_DETAIL = 200


def redact(text: str) -> str:
    """``text`` with the value of every query parameter outside ``HARMLESS_PARAMS`` replaced by ``[REDACTED]``."""
    if "=" not in text:
        return text

    def hide(match: re.Match) -> str:
        sep, name, value = match.groups()
        keep = unquote(name).lower() in HARMLESS_PARAMS or not value
        return f"{sep}{name}={value if keep else REDACTED}"

    return _PARAM.sub(hide, text)


class _RedactFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


_FILTER = _RedactFilter()


class RedactingLogger(glogging.Logger):
    """gunicorn's logger with secrets taken out of the access log's atoms and the error log's lines."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            log.addFilter(_FILTER)

    def atoms(self, resp: Any, req: Any, environ: dict, request_time: Any) -> dict:
        atoms = super().atoms(resp, req, environ, request_time)
        return {k: redact(v) if isinstance(v, str) else v for k, v in atoms.items()}


def problem_bytes(status: int, reason: str, detail: str) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 answer with an RFC 9457 body."""
    slug = reason.lower().replace(" ", "-")
    body = json.dumps({"type": PROBLEM_BASE + slug, "title": reason, "status": status, "detail": detail,
                       "instance": None, "field": None}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: {PROBLEM_MIME}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("latin1") + body


def error_detail(status: int, exc: BaseException, cfg: Any) -> str:
    """What a client is told about a request gunicorn refused (no secret it sent is echoed back)."""
    if status == 414:
        return (f"Expected a request line of at most {cfg.limit_request_line} bytes, but it is longer; send long "
                f"parameters in the request body")
    if status == 431:
        return (f"Expected at most {cfg.limit_request_fields} request headers of at most "
                f"{cfg.limit_request_field_size} bytes each, but got more: {redact(str(exc))[:MAX_DETAIL]}")
    if status >= 500:
        return "an unexpected error occurred; it has been logged"
    return redact(str(exc))[:MAX_DETAIL] or "the request could not be parsed"
