"""The errors a client can fix, shared by the library, the CLI (exit 2) and the service (4xx).

They carry no HTTP status: the web edge (``service/errors.py``) maps each class to one.

Each carries the offending ``field`` and a message in the form "Expected ..., but got ...",
so a user knows what to change without reading a traceback.
"""

from __future__ import annotations


class AuditError(Exception):
    """Base class for every error the audit raises on purpose."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    def to_dict(self) -> dict:
        return {"error": type(self).__name__, "field": self.field, "message": self.message}


class SpecError(AuditError):
    """The group / shift / option spec is malformed or does not fit the model."""


class ModelError(AuditError):
    """The model file cannot be loaded safely, or its signature is not a classifier's."""


class ProbeError(AuditError):
    """Probe or label arrays have the wrong shape, dtype or values."""


class ModelRuntimeError(AuditError):
    """The model ran but misbehaved (crashed, returned NaN/Inf, wrong output shape): the job fails."""
