"""``application/problem+json`` (RFC 9457): one exception type per status, one handler builds the body.

Views raise ``NotFound("...")``, ``Unprocessable("...", field="spec.group")`` and so on; library
errors (``AuditError``: ``SpecError``, ``ModelError``, ``ProbeError``) map to their ``status``;
werkzeug's own HTTP errors (405, 413 from ``MAX_CONTENT_LENGTH``...) and anything unexpected go
through the same handler, so every error a client sees has the same shape.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, json, request
from werkzeug.exceptions import HTTPException

from ..adapters.mlflow_registry import RegistryError, RegistryNotAllowed
from ..engine.errors import AuditError, ModelError, ModelRuntimeError, ProbeError, SpecError

PROBLEM_MIME = "application/problem+json"
PROBLEM_BASE = "https://invariance-audit.dev/problems/"

log = logging.getLogger("audit_service.service")


class ApiError(Exception):
    """An error a view raises: the HTTP status, the problem's title and the slug of its type URI. One subclass a
    status (``_api_error``); ``slug`` names a case within a status (429: which quota)."""

    status: int = 500
    title: str = "Internal Server Error"
    slug: str = "internal-error"

    def __init__(self, detail: str, field: str | None = None, headers: dict[str, str] | None = None,
                 slug: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field
        self.headers = headers or {}
        if slug:
            self.slug = slug


def _api_error(name: str, status: int, title: str, slug: str) -> type[ApiError]:
    """The ``ApiError`` subclass of one status (views raise and catch it by name)."""
    return type(name, (ApiError,), {"status": status, "title": title, "slug": slug, "__module__": __name__})


BadRequest = _api_error("BadRequest", 400, "Bad Request", "bad-request")
Unauthorized = _api_error("Unauthorized", 401, "Unauthorized", "unauthorized")
Forbidden = _api_error("Forbidden", 403, "Forbidden", "forbidden")
NotFound = _api_error("NotFound", 404, "Not Found", "not-found")
Conflict = _api_error("Conflict", 409, "Conflict", "conflict")
PayloadTooLarge = _api_error("PayloadTooLarge", 413, "Payload Too Large", "payload-too-large")
UnsupportedMediaType = _api_error("UnsupportedMediaType", 415, "Unsupported Media Type", "unsupported-media-type")
Unprocessable = _api_error("Unprocessable", 422, "Unprocessable Content", "unprocessable")
TooManyRequests = _api_error("TooManyRequests", 429, "Too Many Requests", "queue-full")
ServiceUnavailable = _api_error("ServiceUnavailable", 503, "Service Unavailable", "unavailable")
InsufficientStorage = _api_error("InsufficientStorage", 507, "Insufficient Storage", "insufficient-storage")


DISK_FULL_DETAIL = ("the service's disk is full, so nothing was stored and no job was created; retry after the "
                    "Retry-After seconds (the operator must free space in the data dir; the service recovers by "
                    "itself once there is room)")


#: the engine's errors that mean "the request was understood but cannot be audited" (422); any other
#: ``AuditError`` is a malformed request (400). The engine's errors carry no HTTP status themselves.
_UNPROCESSABLE = (SpecError, ModelError, ProbeError, ModelRuntimeError, RegistryError)


def problem(status: int, title: str, detail: str, slug: str, field: str | None = None,
            headers: dict[str, str] | None = None) -> Response:
    body = {"type": PROBLEM_BASE + slug, "title": title, "status": status, "detail": detail,
            "instance": request.path if request else None, "field": field}
    response = Response(json.dumps(body), status=status, mimetype=PROBLEM_MIME)
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def _handle(exc: Exception) -> Response:
    if isinstance(exc, ApiError):
        return problem(exc.status, exc.title, exc.detail, exc.slug, exc.field, exc.headers)
    if isinstance(exc, AuditError):
        cls = (Forbidden if isinstance(exc, RegistryNotAllowed) else
               PayloadTooLarge if getattr(exc, "too_large", False) else
               Unprocessable if isinstance(exc, _UNPROCESSABLE) else BadRequest)
        return problem(cls.status, cls.title, exc.message, type(exc).__name__, exc.field)
    if isinstance(exc, HTTPException):
        status = exc.code or 500
        detail = exc.description or exc.name
        if status == 413:
            from flask import current_app

            limit = current_app.config.get("MAX_CONTENT_LENGTH")
            detail = (f"the request body is larger than the service accepts ({limit} bytes, AUDIT_MAX_UPLOAD_MB); "
                      f"send a smaller model or fewer probes")
        headers = {}
        if status == 405 and getattr(exc, "valid_methods", None):
            headers["Allow"] = ", ".join(exc.valid_methods)
        slug = exc.name.lower().replace(" ", "-")
        return problem(status, exc.name, detail, slug, None, headers)
    from ..jobs.blobs import is_disk_full

    if is_disk_full(exc):
        log.error("disk full on %s %s: %s", request.method, request.path, exc)
        return problem(InsufficientStorage.status, InsufficientStorage.title, DISK_FULL_DETAIL,
                       InsufficientStorage.slug, None, {"Retry-After": "60"})
    log.exception("unhandled error on %s %s", request.method, request.path)
    return problem(ApiError.status, ApiError.title, "an unexpected error occurred; it has been logged", ApiError.slug)


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(Exception, _handle)
