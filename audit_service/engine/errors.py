"""The errors a client can fix, shared by the library, the CLI (exit 2) and the service (4xx).

They carry no HTTP status: the web edge (``service/errors.py``) maps each class to one.

Each carries the offending ``field`` and a message in the form "Expected ..., but got ...",
so a user knows what to change without reading a traceback.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator


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


def short_error(exc: BaseException, limit: int = 600) -> str:
    """The user-relevant part of an exception raised by model code: its last line, no traceback.

    TorchScript and onnxruntime errors embed interpreter tracebacks; the last non-empty line holds
    the actual complaint (e.g. "mat1 and mat2 shapes cannot be multiplied").
    """
    text = str(exc).strip() or type(exc).__name__
    if "Traceback" in text or "\n" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        text = lines[-1] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def model_failures(doing: str) -> Iterator[None]:
    """The failure guard around the client's model code, the one place it is written.

    The model may raise anything; our own ``AuditError``s pass unchanged, anything else becomes a
    ``ModelRuntimeError`` on ``model`` that says what was running (``doing`` finishes "The model failed ...",
    e.g. ``"on a batch of 64"`` or ``"while computing the Jacobian"``), the exception's type and its last
    line. Running out of GPU memory says which options to lower instead.
    """
    try:
        yield
    except AuditError:
        raise
    except Exception as exc:  # noqa: BLE001 - user model code can raise anything
        torch = sys.modules.get("torch")  # loaded whenever model code ran; this module does not import it
        if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
            raise ModelRuntimeError(
                f"Out of GPU memory {doing}: lower options.batch_size or options.probe_chunk ({short_error(exc, 300)})",
                field="model",
            ) from None
        raise ModelRuntimeError(
            f"The model failed {doing}: {type(exc).__name__}: {short_error(exc)}", field="model"
        ) from None
