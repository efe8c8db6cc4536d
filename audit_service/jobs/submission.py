"""Submitting an audit, independent of HTTP: admission (disk, queue and tenant limits), dedupe / reuse of a
finished twin, adoption of the staged files and job creation, and waiting for a job to finish.

The web layer parses the request, stages and checks the uploads into a ``Submission``, calls ``admit`` early
and ``submit`` once the inputs are checked, and maps the typed errors here to problem+json answers
(``QueueFull`` / ``TenantLimit`` -> 429, ``DiskFull`` -> 507, ``InvalidSubmission`` -> 422). Nothing here
imports the web layer.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..engine.external_names import location_problem
from ..engine.spec import AuditSpec
from . import estimate
from .blobs import BlobStore
from .settings import Settings
from .states import READY_STATES, JobKind
from .store import Job, JobStore, QueueFull, TenantLimit, TenantStoredLimit

#: the file inputs of an audit, in the order they are staged (the model last: its check needs the others)
FILE_FIELDS = ("model", "probes", "labels", "second_probes")
#: an ONNX model's external data files are inputs named ``model_data/<location>`` (the name the graph gives)
DATA_PREFIX = "model_data/"
#: the names the model itself takes in its staged folder, which no data file may take
MODEL_LINKS = ("model", "model.onnx", "model.pt", "model.pt2")

__all__ = ["DATA_PREFIX", "FILE_FIELDS", "MODEL_LINKS", "DiskFull", "InvalidSubmission", "QueueFull", "Submission",
           "Submitted", "TenantLimit", "TenantStoredLimit", "admit", "check_device", "check_inputs",
           "cuda_available", "data_inputs", "dedupe_key", "free_space_mb", "link_model_folder", "retry_after_s",
           "submit", "wait_for"]


class DiskFull(Exception):
    """The data dir has less than ``min_free_mb`` free: nothing is stored, no job is created."""

    def __init__(self, free_mb: float, min_free_mb: int) -> None:
        super().__init__(f"{free_mb:.0f} MiB free, AUDIT_MIN_FREE_MB={min_free_mb}")
        self.free_mb, self.min_free_mb = free_mb, min_free_mb


class InvalidSubmission(ValueError):
    """The inputs do not fit together (e.g. labels without probes); ``field`` names the culprit."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.message, self.field = message, field


@dataclass(frozen=True)
class Submission:
    """The checked inputs of one audit submission: the validated spec (JSON, defaults filled in), the input
    entries ({field: {sha256, size_bytes, filename, format}}), their private staging files (adopted into
    the blob store only when the job is created), and the client's options."""

    spec: dict
    inputs: dict[str, dict]
    staged: dict[str, Path] = field(default_factory=dict)
    timeout_s: float | None = None
    reuse: bool = True


@dataclass(frozen=True)
class Submitted:
    """The created job; ``reused``: it was born succeeded with a finished twin's report (not dispatched)."""

    job: Job
    reused: bool


def free_space_mb(path: Path) -> float | None:
    """Free space (MiB) for unprivileged writers on the file system of ``path``; None when unknown."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize / (1024 * 1024)


def admit(store: JobStore, settings: Settings, tenant: str) -> None:
    """Cheap early checks before an upload is read (``create`` checks the limits again atomically):
    raises ``DiskFull``, ``QueueFull``, ``TenantLimit`` or ``TenantStoredLimit``."""
    free_mb = free_space_mb(Path(settings.data_dir))
    if free_mb is not None and free_mb < settings.min_free_mb:
        raise DiskFull(free_mb, settings.min_free_mb)
    depth = store.counts_by_status()["queued"]
    if depth >= settings.max_queued:
        raise QueueFull(depth, settings.max_queued)
    mine = store.count_active(tenant)
    if mine >= settings.max_tenant_jobs:
        raise TenantLimit(mine, settings.max_tenant_jobs, tenant)
    kept = store.count_stored(tenant)
    if kept >= settings.max_tenant_stored:
        raise TenantStoredLimit(kept, settings.max_tenant_stored, tenant)


def check_inputs(spec: AuditSpec, present: Iterable[str]) -> None:
    """The file inputs fit together and the spec: labels come with probes, a blend shift that targets
    ``second_probes`` has them. Raises ``InvalidSubmission``."""
    present = set(present)
    if "labels" in present and "probes" not in present:
        raise InvalidSubmission("Expected `probes` with `labels` (labels name the class of each probe), "
                                "but got labels alone", field="labels")
    second_needed = any(s.takes_beta and s.target == "second_probes" for s in spec.effective_shifts)
    if second_needed and "second_probes" not in present:
        raise InvalidSubmission("Expected a `second_probes` file: a blend shift targets second_probes",
                                field="second_probes")


def check_device(spec: AuditSpec, settings: Settings) -> None:
    """``options.device: cuda`` only where a worker can run it (``cuda_available``): a 422 now, never a job
    that fails when a CPU worker takes it. Raises ``InvalidSubmission``."""
    if spec.options.device == "cuda" and not cuda_available(settings):
        raise InvalidSubmission("Expected `options.device` 'auto' or 'cpu': this service's audit workers have no "
                                "CUDA GPU (AUDIT_CUDA, and the gpu queue in AUDIT_WORKER_QUEUES), so 'cuda' could "
                                "only fail when the audit runs; 'auto' uses a GPU where there is one",
                                field="spec.options.device")


def cuda_available(settings: Settings) -> bool:
    """Whether an audit asking for ``device: cuda`` can run (``Settings.cuda``)."""
    mode = str(settings.cuda).strip().lower()
    if mode in ("1", "true", "yes", "on"):
        return True
    if mode in ("0", "false", "no", "off"):
        return False
    if settings.resolved_executor == "celery":
        return True  # the gpu queue's workers run on other hosts; the operator sets AUDIT_CUDA=0 when there are none
    return "gpu" in settings.queues and host_has_cuda()


_HOST_CUDA: list[bool] = []


def host_has_cuda() -> bool:
    """This host has an NVIDIA GPU that the workers may see, and torch is a CUDA build; read from files, without
    importing torch (the web tier never does) and once per process."""
    if not _HOST_CUDA:
        import glob
        import importlib.util

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = bool(glob.glob("/dev/nvidia[0-9]*")) or Path("/proc/driver/nvidia/version").exists()
        built = False
        found = importlib.util.find_spec("torch")
        for folder in (found.submodule_search_locations or []) if found is not None else []:
            try:
                text = (Path(folder) / "version.py").read_text()
            except OSError:
                continue
            built = any(line.replace(" ", "").startswith(("cuda:Optional[str]='", "cuda='"))
                        for line in text.splitlines())
        _HOST_CUDA.append(devices and built and visible not in ("", "-1"))
    return _HOST_CUDA[0]


def retry_after_s(store: JobStore, settings: Settings) -> int:
    """Seconds until a queue slot is likely free: the recent mean run time x work ahead / workers / 4."""
    counts = store.counts_by_status()
    recent = store.durations(limit=20)
    mean = sum(recent) / len(recent) if recent else 30.0
    workers = max(1, settings.workers)
    return int(min(3600, max(1, math.ceil(mean * (counts["queued"] + counts["running"]) / workers / 4))))


def dedupe_key(tenant: str, spec_json: dict, inputs: dict, engine: str) -> str:
    """What makes two submissions the same audit: sha256 of the canonical JSON (sorted keys, no spaces)
    of the tenant, the engine, the validated spec with defaults filled in, and the sha256 of the
    model, probes, labels and second_probes files, and of the model's external data files by the name the
    graph gives them (other file names and ``timeout_s`` do not count)."""
    identity = {"v": 1, "tenant": tenant, "engine": engine, "spec": spec_json,
                "files": {name: (inputs.get(name) or {}).get("sha256") for name in FILE_FIELDS}}
    data = data_inputs(inputs)
    if data:  # absent without external data: the keys of earlier audits stay what they were
        identity["model_data"] = {name: entry.get("sha256") for name, entry in data.items()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def data_inputs(inputs: dict) -> dict[str, dict]:
    """{location: entry} of the model's external data files among a job's input entries."""
    return {key[len(DATA_PREFIX):]: entry for key, entry in sorted((inputs or {}).items())
            if key.startswith(DATA_PREFIX) and isinstance(entry, dict)}


def link_model_folder(folder: Path, model: Path, model_name: str, data: dict[str, Path]) -> tuple[Path, list[Path]]:
    """The model's own folder for the sandbox: ``folder/model_name`` linked to ``model`` and each external data
    file linked beside it under its location, nothing else (the runtime reads data files from the model's
    folder only). The links are ours, to files of the blob store or staging; a name that is not a plain file
    name, or that the model takes, was refused at submission and is never linked. (model link, data links)."""
    folder.mkdir()
    link = folder / model_name
    os.symlink(os.path.realpath(model), link)
    links = []
    for name, target in sorted(data.items()):
        if location_problem(name) is not None or name in MODEL_LINKS:
            continue
        os.symlink(os.path.realpath(target), folder / name)
        links.append(folder / name)
    return link, links


def submit(store: JobStore, blobs: BlobStore, settings: Settings, tenant: str, submission: Submission) -> Submitted:
    """Create the job of a checked ``submission``: reuse a finished twin's report when dedupe allows, else
    insert a queued job under the queue and tenant limits (``QueueFull`` / ``TenantLimit``). The staged
    files are adopted into the blob store in the same pinned window; on any failure the adopted blobs no
    job refers to are removed again. The caller still deletes the staging files (adopted ones are moved)."""
    spec = submission.spec
    timeout = min(submission.timeout_s or settings.job_timeout_s, settings.job_timeout_s)
    device = (spec.get("options") or {}).get("device") if isinstance(spec, dict) else None
    queue = "gpu" if device == "cuda" else settings.default_queue
    key = dedupe_key(tenant, spec, submission.inputs, settings.engine)
    twin = store.find_finished(key, tenant) if settings.dedupe and submission.reuse else None
    too_long = estimate.refusal(spec, submission.inputs.get("model") or {}, timeout, settings.job_timeout_s)
    if too_long is not None and twin is None:  # cost before work (jobs/estimate.py)
        raise InvalidSubmission(*too_long)
    adopted: list[str] = []
    try:
        with blobs.pinned():  # no blob collection between adopting the files and committing the job
            for name, path in submission.staged.items():
                blobs.adopt(path, submission.inputs[name]["sha256"])
                adopted.append(submission.inputs[name]["sha256"])
            if twin is not None:
                job = store.create_reused(source=twin, spec=spec, inputs=submission.inputs,
                                          timeout_s=timeout, tenant=tenant, queue=queue, dedupe_key=key,
                                          max_tenant_stored=settings.max_tenant_stored)
            else:
                job = store.create(kind=JobKind.AUDIT, spec=spec, inputs=submission.inputs, timeout_s=timeout,
                                   max_attempts=settings.max_attempts, tenant=tenant, max_queued=settings.max_queued,
                                   max_tenant_jobs=settings.max_tenant_jobs, queue=queue, dedupe_key=key,
                                   max_tenant_stored=settings.max_tenant_stored)
        adopted.clear()
    finally:
        if adopted:  # adopted, but no job refers to them: the submission failed after all
            blobs.remove_unreferenced(adopted, store.references_blob)
    return Submitted(job=job, reused=twin is not None)


def wait_for(store: JobStore, job: Job, wait_s: float) -> Job:
    """Poll the store with growing pauses until ``job`` is ready or ``wait_s`` passed; the last state seen.
    Under serve's gevent workers ``time.sleep`` is a greenlet sleep: a waiter holds no thread and no
    database connection meanwhile."""
    deadline = time.monotonic() + wait_s
    delay = 0.05
    while wait_s > 0 and time.monotonic() < deadline:
        current = store.get(job.id)
        if current is None:
            break
        job = current
        if job.status in READY_STATES:
            break
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 0.5)
    return job
