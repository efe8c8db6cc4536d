"""gunicorn entry point: ``gunicorn audit_service.service.wsgi:app`` (configured from ``AUDIT_*``)."""

from .app import create_app

app = create_app()

if app.extensions["audit"].settings.warm_sandbox:
    from ..jobs.launcher import fork_server

    # start the model-check fork server now and wait for its imports (torch...), so that no submission
    # pays them; it belongs to this worker's main thread, so it goes when the worker goes
    fork_server().warm(wait=True)
