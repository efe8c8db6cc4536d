"""gunicorn entry point: ``gunicorn audit_service.service.wsgi:app`` (configured from ``AUDIT_*``)."""

from .app import create_app

app = create_app()
