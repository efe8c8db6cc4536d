"""The HTTP service: ``create_app`` (Flask app factory), blueprints, problem+json errors."""

from .app import create_app

__all__ = ["create_app"]
