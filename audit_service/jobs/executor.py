"""How a queued job reaches a worker. The web app only calls ``Executor.dispatch(job)``.

* ``LocalExecutor`` (the embedded default): nothing to send — local worker processes
  (``audit-service worker``, started by ``serve``) poll the job store and claim atomically.
* A Celery executor (``AUDIT_EXECUTOR=celery``, the scale-out mode) will send the job id to a
  queue named after ``job["queue"]``; its task claims that id (``JobStore.claim(job_id=...)``) and
  calls the same ``jobs.worker.run_job``.
"""

from __future__ import annotations

from typing import Protocol

from .settings import Settings


class Executor(Protocol):
    name: str

    def dispatch(self, job: dict) -> None:
        """Hand a freshly queued job to whatever runs jobs (must not block on the job itself)."""


class LocalExecutor:
    name = "local"

    def dispatch(self, job: dict) -> None:  # workers poll the store
        return None


def get_executor(settings: Settings) -> Executor:
    if settings.executor == "local":
        return LocalExecutor()
    raise ValueError(f"Expected AUDIT_EXECUTOR to be one of: local, but got {settings.executor!r}")
