"""The scale-out mode: audits run on Celery workers fed through a Redis broker; job state stays in
the database at ``AUDIT_DATABASE_URL``.

The broker carries only a job id. The task claims that job atomically in the database
(``JobStore.claim(job_id=...)``) and calls ``worker.run_job`` — the very code the local workers run,
with the same sandboxed child — so a duplicate or redelivered message can never run a job twice.

Delivery guarantees, and what happens when things die:

* ``acks_late`` + ``task_reject_on_worker_lost``: the message is acknowledged only after the job
  reached a final state; a pool process killed mid-audit puts its message back on the queue at once.
* ``worker_prefetch_multiplier=1`` and one pool process per ``--concurrency``: a worker holds one
  job per process, never a backlog that dies with it.
* Time limits: the sandbox's own wall clock (``timeout_s``) kills the audit first; Celery's soft/hard
  limits (``+60 s`` / ``+120 s``) are the backstop for a stuck worker process.
* The reaper (a thread in every worker's main process, every ``lease_s / 2``): a running job whose
  lease expired (its machine died, or the whole worker was ``kill -9``-ed) goes back to the queue (or
  fails once its attempts are spent) and is sent again; queued jobs the broker never got (web
  process could not reach it) or lost are re-sent. Duplicates are harmless (the claim decides).
* One queue per device kind: ``cpu`` and ``gpu`` (``spec.options.device == "cuda"`` -> ``gpu``; other
  audits -> ``AUDIT_DEFAULT_QUEUE``). GPU machines run ``audit-service worker --queues gpu``.

Start a worker: ``audit-service worker`` with ``AUDIT_BROKER_URL`` set (it runs ``celery -A
audit_service.jobs.celery_app worker`` with the options above).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from celery import Celery, signals

from .blobs import BlobStore
from .settings import Settings
from .states import JobStatus
from .store import Job, JobStore

log = logging.getLogger("audit_service.celery")

TASK_NAME = "audit_service.run_job"
QUEUES = ("cpu", "gpu")


def make_celery(settings: Settings) -> Celery:
    app = Celery("audit_service", broker=settings.broker_url or "redis://127.0.0.1:6379/0")
    visibility = settings.broker_visibility_s or settings.job_timeout_s + 600
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=200,
        task_soft_time_limit=settings.job_timeout_s + 60,
        task_time_limit=settings.job_timeout_s + 120,
        task_default_queue=settings.default_queue,
        task_create_missing_queues=True,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": visibility},
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )
    return app


settings = Settings.from_env()
app = make_celery(settings)


def _store_and_blobs(s: Settings) -> tuple[JobStore, BlobStore]:
    return JobStore(s.resolved_database_url), BlobStore(Path(s.data_dir) / "blobs")


def send(celery: Celery, job: Job, store: JobStore) -> None:
    """Put ``job``'s id on its queue and record when (a failure leaves it for the reaper)."""
    queue = job.queue if job.queue in QUEUES else "cpu"
    celery.send_task(TASK_NAME, args=[job.id], queue=queue, retry=True,
                     retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5})
    store.mark_dispatched(job.id)


_STOP = threading.Event()


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def run_job_task(self, job_id: str) -> str:  # noqa: ANN001
    return execute(job_id, settings)


def execute(job_id: str, s: Settings, stop: threading.Event | None = None) -> str:
    """Claim ``job_id`` and run it with ``worker.run_job``; the outcome as a word (for logs)."""
    from .worker import owner_is_dead_locally, process_owner_id, run_job

    store, blobs = _store_and_blobs(s)
    job = store.get(job_id)
    if job is None:
        return "gone"
    if job.status == JobStatus.RUNNING:
        # a redelivery: the job's last holder died (this host) or its lease ran out -> take it back
        dead = [job.owner] if job.owner and owner_is_dead_locally(job.owner) else []
        expired = (job.lease_expires_at or 0) < time.time()
        if not dead and not expired:
            return "running elsewhere"
        store.recover_lost(dead_owners=dead)
    owner = process_owner_id()
    claimed = store.claim(owner, s.lease_s, job_id=job_id)
    if claimed is None:
        current = store.get(job_id)
        return f"not queued ({current.status.value if current is not None else 'gone'})"
    outcome = run_job(claimed, store, blobs, s, owner, stop or _STOP)
    if outcome.status == JobStatus.QUEUED:  # released on shutdown: hand it to another worker
        try:
            send(app, claimed, store)
        except Exception:  # noqa: BLE001 - the reaper re-sends it
            log.exception("could not re-send job %s", job_id)
    return outcome.status.value


def reap_once(s: Settings, celery: Celery) -> list[str]:
    """Recover jobs of dead workers and (re-)send queued jobs the broker does not hold; returns the
    ids sent."""
    from .worker import owner_is_dead_locally

    store, _ = _store_and_blobs(s)
    dead = [o for o in store.running_owners() if owner_is_dead_locally(o)]
    for job_id, what in store.recover_lost(dead_owners=dead):
        log.warning("job %s from a lost worker: %s", job_id, what)
    now = time.time()
    visibility = s.broker_visibility_s or s.job_timeout_s + 600
    sent = []
    for job in store.undispatched(older_than=now - 2.0, redispatch_after=now - visibility):
        try:
            send(celery, job, store)
            sent.append(job.id)
        except Exception as exc:  # noqa: BLE001 - broker down: try again next round
            log.warning("could not send job %s: %s", job.id, exc)
            break
    return sent


def _reaper_loop(s: Settings) -> None:
    while not _STOP.wait(max(1.0, s.lease_s / 2)):
        try:
            reap_once(s, app)
        except Exception:  # noqa: BLE001 - database hiccup: next round
            log.exception("reaper round failed")


@signals.worker_ready.connect
def _start_reaper(**_kwargs: object) -> None:
    JobStore(settings.resolved_database_url).init_schema()
    threading.Thread(target=_reaper_loop, args=(settings,), name="audit-reaper", daemon=True).start()


@signals.worker_shutting_down.connect
def _stop_jobs(**_kwargs: object) -> None:
    # stops the reaper; with ``--pool solo`` also the running job (run_job kills the sandbox and puts
    # the job back, execute() re-sends it). Prefork pool processes finish their audit (warm shutdown)
    # or, on a cold shutdown, die and their message goes back to the queue (reject_on_worker_lost).
    _STOP.set()
