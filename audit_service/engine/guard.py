"""The failure guard: model code may raise anything; the client gets a ``ModelRuntimeError`` saying where."""

from __future__ import annotations

from typing import Callable, TypeVar

from .errors import model_failures

T = TypeVar("T")


def guarded(fn: Callable[[], T], what: str) -> T:
    """Run model code; turn anything but our own errors into a ModelRuntimeError saying where."""
    with model_failures(f"while {what}"):
        return fn()
