"""The HTTP service: ``create_app`` (Flask app factory), blueprints, problem+json errors.

``create_app`` is imported on first use, so the CLI's ``serve`` / ``submit`` commands (which live in
this package) start without importing Flask and the engine.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
