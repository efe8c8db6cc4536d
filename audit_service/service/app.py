"""``create_app(config=None)``: defaults, then ``AUDIT_*`` environment, then ``config``; blueprints inside.

``config`` may hold ``Settings`` field names in lower case (``{"data_dir": tmp, "max_queued": 2}``),
a ready ``Settings`` under ``"SETTINGS"``, and plain Flask keys in upper case (``TESTING``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping

from flask import Flask

from ..jobs.blobs import BlobStore
from ..jobs.executor import get_executor
from ..jobs.settings import Settings
from ..jobs.store import JobStore
from .auth import init_auth
from .errors import register_error_handlers
from .state import ServiceState

MiB = 1024 * 1024


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    overrides = dict(config or {})
    settings = overrides.pop("SETTINGS", None)
    if settings is None:
        names = {f.name for f in dataclasses.fields(Settings)}
        settings = Settings.from_env(**{k: v for k, v in overrides.items() if k in names})
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_upload_mb * MiB,
        MAX_FORM_MEMORY_SIZE=1 * MiB,
        JSON_SORT_KEYS=False,
    )
    app.config.update({k: v for k, v in overrides.items() if k.isupper()})

    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    store = JobStore(settings.resolved_database_url)
    store.init_schema()
    app.extensions["audit"] = ServiceState(settings, store, BlobStore(Path(settings.data_dir) / "blobs"),
                                           get_executor(settings))
    app.json.sort_keys = False  # type: ignore[attr-defined]

    register_error_handlers(app)
    init_auth(app, settings)
    from . import audits, catalog, front, ops, references

    app.register_blueprint(audits.bp)
    app.register_blueprint(catalog.bp)
    app.register_blueprint(references.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(front.bp)
    logging.getLogger("audit_service").setLevel(logging.INFO)
    return app
