"""The per-app state every blueprint reads: one ``ServiceState`` in ``app.extensions["audit"]``, and the
request's tenant. Blueprints import this module, never the app factory (``app.py`` imports them)."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app, g

from ..jobs.blobs import BlobStore
from ..jobs.executor import Executor
from ..jobs.settings import Settings
from ..jobs.store import DEFAULT_TENANT, JobStore


@dataclass
class ServiceState:
    settings: Settings
    store: JobStore
    blobs: BlobStore
    executor: Executor


def state() -> ServiceState:
    return current_app.extensions["audit"]


def current_tenant() -> str:
    """The tenant of this request (``auth`` sets ``g.tenant`` from the bearer token; ``default`` when open)."""
    return g.get("tenant", DEFAULT_TENANT)
