"""How a queued job reaches a worker. The web app only calls ``Executor.dispatch(job)``.

* ``LocalExecutor`` (the embedded default): nothing to send — local worker processes
  (``audit-service worker``, started by ``serve``) poll the job store and claim atomically.
* ``CeleryExecutor`` (``AUDIT_BROKER_URL`` set, or ``AUDIT_EXECUTOR=celery``): sends the job id to the
  Celery queue named by ``job.queue`` (``cpu`` / ``gpu``); the task (``jobs.celery_app``) claims that
  id and calls the same ``jobs.worker.run_job``. A broker that cannot be reached does not lose the job:
  it stays queued with no ``dispatched_at`` and the workers' reaper sends it later.
"""

from __future__ import annotations

import logging
from typing import Protocol

from .settings import Settings
from .store import Job, JobStore

log = logging.getLogger("audit_service.executor")


class Executor(Protocol):
    name: str

    def dispatch(self, job: Job) -> None:
        """Hand a freshly queued job to whatever runs jobs (must not block on the job itself)."""


class LocalExecutor:
    name = "local"

    def dispatch(self, job: Job) -> None:  # workers poll the store
        return None


class CeleryExecutor:
    name = "celery"

    def __init__(self, settings: Settings) -> None:
        from .celery_app import make_celery

        if not settings.broker_url:
            raise ValueError("Expected AUDIT_BROKER_URL (e.g. redis://127.0.0.1:6379/0) with AUDIT_EXECUTOR=celery, "
                             "but it is not set")
        self.celery = make_celery(settings)
        self.store = JobStore(settings.resolved_database_url)

    def dispatch(self, job: Job) -> None:
        from .celery_app import send

        try:
            send(self.celery, job, self.store)
        except Exception as exc:  # noqa: BLE001 - the job is safe in the database; the reaper re-sends it
            log.warning("broker unreachable, job %s stays queued for the reaper: %s", job.id, exc)


def get_executor(settings: Settings) -> Executor:
    kind = settings.resolved_executor
    if kind == "local":
        return LocalExecutor()
    if kind == "celery":
        return CeleryExecutor(settings)
    raise ValueError(f"Expected AUDIT_EXECUTOR to be one of: auto, local, celery, but got {settings.executor!r}")
