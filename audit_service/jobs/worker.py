"""Local workers: claim queued jobs from the store and run each in a sandboxed child process.

``run_job`` is the executor-independent part (the Celery task of the scale-out mode calls the same
function for the job it was handed); ``Worker.run`` is the local loop: recover lost jobs, claim the
oldest queued one, run it, repeat. A worker holds a lease on its job and renews it while the child
runs; a worker that dies stops renewing and the job is taken back (retried once, then failed).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from ..engine.schema import MlflowWriteBack, Report
from .blobs import BlobStore
from .failures import cap_text, signal_reason
from .launcher import Limits, SandboxStuck, launch, task_env
from .pages import RENDER_BUDGET_S, store_page
from .sandbox import RESULT_UNWRITTEN
from .settings import Settings
from .states import JobKind, JobStatus
from .store import Job, JobError, JobStore
from .submission import data_inputs, link_model_folder
from .write_back import requested, write_back

log = logging.getLogger("audit_service.worker")

#: the lease held over one MLflow write-back attempt (MLflow's own HTTP timeout and retries fit inside it)
WRITE_BACK_LEASE_S = 180.0

def process_owner_id() -> str:
    """``host:pid:starttime:rand`` — identifies this process even across pid reuse."""
    import uuid

    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}:{uuid.uuid4().hex[:6]}"


def _start_time(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def owner_is_dead_locally(owner: str) -> bool:
    """True when ``owner`` names a process on this host that no longer exists."""
    parts = owner.split(":")
    if len(parts) < 3 or parts[0] != socket.gethostname():
        return False
    try:
        pid = int(parts[1])
    except ValueError:
        return False
    if not Path(f"/proc/{pid}").exists():
        return True
    return _start_time(pid) != parts[2]


def _gpu_present() -> bool:
    return os.path.exists("/dev/nvidiactl")


@dataclass
class Outcome:
    status: JobStatus
    detail: str = ""


_SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2", "npy": ".npy", "npz": ".npz"}


def build_task(job: Job, blobs: BlobStore, settings: Settings, workdir: Path) -> dict:
    """The sandbox's ``task.json``; input blobs are linked into ``workdir`` under telling suffixes, the model
    into a folder of its own (``workdir/model/``) with its ONNX external data files beside it, under the
    names its graph gives them (``model_data``)."""
    if job.kind == JobKind.REFERENCE_RUN.value:
        return {"kind": "reference_run", **job.spec}
    inputs = job.inputs

    def blob(name: str) -> str | None:
        entry = inputs.get(name)
        if not entry:
            return None
        link = workdir / f"{name}{_SUFFIX.get(entry.get('format') or '', '')}"
        link.symlink_to(blobs.path(entry["sha256"]))
        return str(link)

    model, data = inputs.get("model"), []
    if model:
        model_link, data = link_model_folder(
            workdir / "model", blobs.path(model["sha256"]), f"model{_SUFFIX.get(model.get('format') or '', '')}",
            {name: blobs.path(entry["sha256"]) for name, entry in data_inputs(inputs).items()})
    return {"kind": "audit", "engine": settings.engine, "spec": job.spec,
            "model": str(model_link) if model else None, "model_data": [str(p) for p in data],
            "probes": blob("probes"), "labels": blob("labels"), "second_probes": blob("second_probes")}


def run_job(job: Job, store: JobStore, blobs: BlobStore, settings: Settings, owner: str,
            stop: threading.Event | None = None) -> Outcome:
    """Run a job this worker has claimed (status running, owner ``owner``) to its end."""
    stop = stop or threading.Event()
    workdir = Path(settings.data_dir) / "work" / f"{job.id}-{job.attempts}"
    try:
        return _run_in(workdir, job, store, blobs, settings, owner, stop)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run_in(workdir: Path, job: Job, store: JobStore, blobs: BlobStore, settings: Settings, owner: str,
            stop: threading.Event) -> Outcome:
    job_id = job.id
    if workdir.exists():
        shutil.rmtree(workdir, ignore_errors=True)
    try:
        (workdir / "tmp").mkdir(parents=True)
        (workdir / "task.json").write_text(json.dumps(build_task(job, blobs, settings, workdir)))
    except OSError as exc:  # a full disk, most often: the job fails with the reason, the next one runs
        err = JobError("worker_disk", f"the worker could not prepare the audit's work dir ({exc}); the disk "
                                      f"holding AUDIT_DATA_DIR may be full: free space and resubmit")
        store.fail(job_id, err, owner=owner)
        return Outcome(JobStatus.FAILED, err.message)

    spec_device = (job.spec.get("options") or {}).get("device", "auto")
    memory_mb = settings.job_memory_mb
    if memory_mb > 0 and spec_device != "cpu" and _gpu_present():
        # CUDA reserves far more address space than it uses; RLIMIT_AS would break it
        memory_mb = 0
    # no database URL, broker URL or tokens for model code: only the runtime's own knobs pass (launcher)
    limits = Limits(memory_mb=memory_mb, cpu_s=settings.job_cpu_s,
                    netns=settings.sandbox_netns != "off" and job.kind != JobKind.REFERENCE_RUN.value,
                    file_mb=settings.sandbox_file_mb,
                    env={**task_env(workdir, settings),
                         "AUDIT_SANDBOX_MEMORY_MB": str(memory_mb),
                         "AUDIT_MAX_MODEL_BYTES": str(settings.max_model_mb * 1024 * 1024)})
    timeout_s = float(job.timeout_s)
    try:
        child = launch(workdir, limits, warm=bool(settings.warm_sandbox))
    except OSError as exc:
        err = JobError("sandbox_start", f"the audit's sandbox could not be started ({exc}); the disk or the "
                                        f"process table may be full")
        store.fail(job_id, err, owner=owner)
        return Outcome(JobStatus.FAILED, err.message)
    started = time.monotonic()
    lease_every = max(0.5, settings.lease_s / 3)
    last_beat = last_scratch_check = 0.0
    last_renewed = time.monotonic()
    last_progress: bytes | None = None
    reason: str | None = None  # why the parent stopped the child
    try:
        store.heartbeat(job_id, owner, settings.lease_s, stage="starting", sandbox_pid=child.pid)
    except Exception as exc:  # noqa: BLE001 - the child runs already: supervise it whatever the database says
        log.warning("job %s: heartbeat failed (%s); supervising on", job_id, exc)
    while child.poll() is None:
        time.sleep(0.1)
        now = time.monotonic()
        progress = stage = None
        try:
            raw = (workdir / "progress.json").read_bytes()
            if raw != last_progress:
                last_progress = raw
                data = json.loads(raw)
                progress, stage = float(data["progress"]), str(data["stage"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if progress is not None or now - last_beat >= lease_every:
            last_beat = now
            try:
                if not store.heartbeat(job_id, owner, settings.lease_s, progress=progress, stage=stage):
                    reason = "lost"  # cancelled, or taken back by recovery
                last_renewed = now
            except Exception as exc:  # noqa: BLE001 - disk full, database gone: keep supervising
                log.warning("job %s: heartbeat failed (%s); supervising on", job_id, exc)
                if now - last_renewed > settings.lease_s:
                    reason = "lost"  # the lease has lapsed: another worker may take the job back
        if reason is None and now - started > timeout_s:
            reason = "timeout"
        if reason is None and now - last_scratch_check >= 1.0:
            last_scratch_check = now
            if _dir_bytes(workdir) > settings.job_scratch_mb * 1024 * 1024:
                reason = "scratch"
        if reason is None and stop.is_set():
            reason = "shutdown"
        if reason is not None:
            break
    try:  # whatever happened, the whole group is gone before the job is recorded
        rc = child.end()
    except SandboxStuck as exc:
        err = JobError("sandbox_stuck", f"{exc}; the job is failed and the operator should look at the host")
        log.error("job %s: %s", job_id, exc)
        store.fail(job_id, err, owner=owner)
        return Outcome(JobStatus.FAILED, err.message)
    elapsed = time.monotonic() - started
    if reason is None and _dir_bytes(workdir) > settings.job_scratch_mb * 1024 * 1024:
        reason = "scratch"  # a child quicker than the periodic check is held to the same cap
    return _settle(job, store, owner, workdir, rc, reason, elapsed, timeout_s, memory_mb, settings)


def _dir_bytes(root: Path) -> int:
    """Bytes under ``root`` (the sandbox's work dir), without following links."""
    total = 0
    stack = [root]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_blocks * 512
        except OSError:
            continue
    return total


def _settle(job: Job, store: JobStore, owner: str, workdir: Path, rc: int, reason: str | None,
            elapsed: float, timeout_s: float, memory_mb: int, settings: Settings) -> Outcome:
    job_id = job.id
    if reason == "lost":
        return Outcome(JobStatus.CANCELLED, "the job was cancelled or taken back while running")
    if reason == "shutdown":
        store.release(job_id, owner)
        return Outcome(JobStatus.QUEUED, "worker shutting down; job put back in the queue")
    if reason == "scratch":
        err = JobError("scratch_limit", f"the audit wrote more than {settings.job_scratch_mb} MiB into its "
                                        f"scratch dir (AUDIT_JOB_SCRATCH_MB) and was stopped; the model writes "
                                        f"files or prints without bound")
        store.fail(job_id, err, owner=owner)
        return Outcome(JobStatus.FAILED, err.message)
    if reason == "timeout":
        err = JobError("timeout", f"the audit did not finish within its wall-clock limit of {timeout_s:g} s "
                                  f"and was killed with its process group; lower options.n_probes / ig_steps or "
                                  f"the number of shifts, or raise timeout_s (server cap AUDIT_JOB_TIMEOUT_S="
                                  f"{settings.job_timeout_s:g})")
        store.fail(job_id, err, owner=owner)
        return Outcome(JobStatus.FAILED, err.message)
    result = None
    try:
        # read no more than a report may hold (with room for the examples the store drops): a model
        # that writes a huge result.json must not make the worker load it
        if (workdir / "result.json").stat().st_size > 4 * settings.max_report_mb * 1024 * 1024:
            err = JobError("report_too_large", f"the audit's result is larger than 4 x AUDIT_MAX_REPORT_MB="
                                               f"{settings.max_report_mb} MiB and was not read")
            store.fail(job_id, err, owner=owner)
            return Outcome(JobStatus.FAILED, err.message)
        result = json.loads((workdir / "result.json").read_text())
    except (OSError, ValueError):
        pass
    if rc == 0 and isinstance(result, dict) and result.get("ok"):
        # the profile, the write-back and the page take seconds past the sandbox: keep the job ours meanwhile,
        # or a short lease runs out and the job is taken back as lost although its result is here
        _hold(store, job_id, owner, max(settings.lease_s, RENDER_BUDGET_S + 30), "saving the report")
        if job.kind == JobKind.REFERENCE_RUN.value:  # a reference run's card: stored as the sandbox wrote it
            saved = store.succeed(job_id, owner, result.get("report") or {})
        else:
            try:  # the sandbox's report is checked first: anything else the worker does reads it typed
                report = Report.model_validate(result.get("report") or {})
            except ValidationError as exc:
                first = exc.errors()[0]
                err = JobError("invalid_report", cap_text(f"the audit's report does not match the report's models "
                                                          f"({first['loc']}: {first['msg']}); nothing was recorded"))
                store.fail(job_id, err, owner=owner)
                return Outcome(JobStatus.FAILED, err.message)
            _complete(job, report, store, owner, settings)
            store_page(settings.data_dir, job, report)  # before succeed: the page is there when the job is
            saved = store.succeed(job_id, owner, report)
        if saved:
            return Outcome(JobStatus.SUCCEEDED)
        return Outcome(JobStatus.CANCELLED, "the job was cancelled while its result was being saved")
    if isinstance(result, dict) and not result.get("ok") and isinstance(result.get("error"), dict):
        e = result["error"]
        err = JobError(str(e.get("type") or "audit_failed")[:64],
                       cap_text(str(e.get("message") or "the audit failed")),
                       str(e["field"])[:128] if e.get("field") else None)
    else:
        err = JobError(*_crash_reason(rc, elapsed, memory_mb, settings, workdir))
    store.fail(job_id, err, owner=owner)
    return Outcome(JobStatus.FAILED, err.message)


def _complete(job: Job, typed: Report, store: JobStore, owner: str, settings: Settings) -> None:
    """Add to the sandbox's checked report what only the worker can: the closest shipped reference run (outside
    the sandbox's reach) and, when asked for, the MLflow write-back's outcome."""
    from ..reference.catalog import closest_reference_profile

    typed.reference_profile = closest_reference_profile(typed)
    request = requested(job)
    if request is not None:
        def hold_lease() -> bool:  # the registry may take a while: keep the job ours, say what it waits on
            try:
                return store.heartbeat(job.id, owner, max(settings.lease_s, WRITE_BACK_LEASE_S),
                                       stage="writing back to MLflow")
            except Exception as exc:  # noqa: BLE001 - as in supervision: a failed beat is not a lost job
                log.warning("job %s: heartbeat failed (%s); writing back anyway", job.id, exc)
                return True

        # before succeed: a worker lost in between leaves a job that runs again, write-back included
        typed.mlflow_write_back = MlflowWriteBack.model_validate(
            write_back(request, typed, settings, before_attempt=hold_lease, tenant=job.tenant, job_id=job.id))


def _hold(store: JobStore, job_id: str, owner: str, lease_s: float, stage: str) -> None:
    try:
        store.heartbeat(job_id, owner, lease_s, stage=stage)
    except Exception as exc:  # noqa: BLE001 - as in supervision: a failed beat is not a lost job
        log.warning("job %s: heartbeat failed (%s); saving on", job_id, exc)


def _crash_reason(rc: int, elapsed: float, memory_mb: int, settings: Settings, workdir: Path) -> tuple[str, str]:
    limits = (f"limits: memory {memory_mb or 'unlimited'} MiB, CPU {settings.job_cpu_s} s")
    if rc < 0:
        kind, what = signal_reason(rc)
        return kind, f"the audit process {what} after {elapsed:.1f} s ({limits}); the service and other jobs " \
                     f"are unaffected"
    if rc == RESULT_UNWRITTEN:
        return "result_unwritten", f"the audit finished after {elapsed:.1f} s but could not write its result " \
                                   f"(the disk holding AUDIT_DATA_DIR may be full); nothing was recorded"
    tail = ""
    try:
        with open(workdir / "stderr.log", "rb") as fh:  # only its end: a model may print without bound
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 4096))
            lines = fh.read().decode(errors="replace").strip().splitlines()
        tail = lines[-1][:300] if lines else ""
    except OSError:
        pass
    return "crashed", f"the audit process exited with status {rc} after {elapsed:.1f} s without a result " \
                      f"({limits}){': ' + tail if tail else ''}"


class Worker:
    """One local worker: a loop that claims and runs one job at a time."""

    def __init__(self, settings: Settings, stop: threading.Event | None = None) -> None:
        self.settings = settings
        self.store = JobStore(settings.resolved_database_url)
        self.blobs = BlobStore(Path(settings.data_dir) / "blobs")
        self.owner = process_owner_id()
        self.stop = stop or threading.Event()
        self._last_recovery = 0.0

    def recover(self) -> None:
        dead = [o for o in self.store.running_owners() if owner_is_dead_locally(o)]
        for job_id, what in self.store.recover_lost(dead_owners=dead):
            log.warning("job %s from a lost worker: %s", job_id, what)

    def run_once(self) -> bool:
        """Claim and run one job; False when the queue was empty."""
        now = time.monotonic()
        if now - self._last_recovery > max(1.0, self.settings.lease_s / 2):
            self._last_recovery = now
            self.recover()
        queues = self.settings.queues if self.settings.worker_queues else None
        job = self.store.claim(self.owner, self.settings.lease_s, queues=queues)
        if job is None:
            return False
        log.info("job %s claimed (attempt %d)", job.id, job.attempts)
        outcome = run_job(job, self.store, self.blobs, self.settings, self.owner, self.stop)
        log.info("job %s -> %s %s", job.id, outcome.status.value, outcome.detail)
        return True

    def run(self) -> None:
        self.store.init_schema()
        if self.settings.warm_sandbox:
            from .launcher import fork_server

            fork_server().warm()  # imports torch once, now, instead of in the first audit
        while not self.stop.is_set():
            try:
                if not self.run_once():
                    self.stop.wait(self.settings.poll_s)
            except Exception:  # noqa: BLE001 - a database hiccup must not end the worker
                log.exception("worker loop error; retrying")
                self.stop.wait(1.0)


def _worker_process_main(env: dict[str, str]) -> None:  # pragma: no cover - child process
    from .launcher import _libc

    libc = _libc()
    if libc is not None:  # go when the supervisor goes, even on kill -9
        libc.prctl(1, signal.SIGTERM)
    os.environ.update(env)
    run_workers(Settings.from_env(), processes=1)


def run_workers(settings: Settings, processes: int = 1) -> int:
    """Run ``processes`` workers until SIGTERM/SIGINT; a running job is put back in the queue."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s")
    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    JobStore(settings.resolved_database_url).init_schema()
    if processes <= 1:
        Worker(settings, stop).run()
        return 0
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    children = [ctx.Process(target=_worker_process_main, args=(settings.as_env(),), daemon=False)
                for _ in range(processes)]
    for child in children:
        child.start()
    restarts: list[float] = []
    while not stop.is_set():
        for i, child in enumerate(children):
            if not child.is_alive() and len([t for t in restarts if t > time.monotonic() - 60]) < 10:
                # killed under us: a fresh process takes back the job it held (owner dead) and goes on
                log.warning("worker process %s exited with %s; starting another", child.pid, child.exitcode)
                restarts.append(time.monotonic())
                children[i] = ctx.Process(target=_worker_process_main, args=(settings.as_env(),), daemon=False)
                children[i].start()
        if not any(c.is_alive() for c in children):
            break
        stop.wait(0.5)
    for child in children:
        if child.is_alive():
            os.kill(child.pid, signal.SIGTERM)
    for child in children:
        child.join(30)
        if child.is_alive():
            child.kill()
    return 0
