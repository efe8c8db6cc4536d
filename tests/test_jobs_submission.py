"""The jobs layer's submission (``jobs.submission``) and typed job (``JobStore.get``) without a server:
admission errors, dedupe / reuse of a finished twin, adoption of staged files, every status change checked."""

from __future__ import annotations

import io

import pytest

from audit_service.jobs import BlobStore, Job, JobKind, JobStatus, JobStore, QueueFull, Settings, TenantLimit
from audit_service.jobs import submission
from audit_service.engine.spec import parse_audit_spec
from reports import stored_report


@pytest.fixture
def env(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    store.init_schema()
    blobs = BlobStore(tmp_path / "blobs")
    settings = Settings(data_dir=tmp_path, max_queued=2, max_tenant_jobs=5, min_free_mb=0)
    return store, blobs, settings


def _submission(blobs: BlobStore, content: bytes = b"model bytes", reuse: bool = True) -> submission.Submission:
    staged, sha, size = blobs.stage(io.BytesIO(content))
    spec = parse_audit_spec({"group": "C4"}).model_dump(mode="json", exclude_none=False)
    return submission.Submission(spec=spec, inputs={"model": {"sha256": sha, "size_bytes": size, "format": "onnx"}},
                                 staged={"model": staged}, reuse=reuse)


def test_submit_creates_a_typed_queued_job_and_adopts_its_files(env):
    store, blobs, settings = env
    sub = _submission(blobs)
    done = submission.submit(store, blobs, settings, "alice", sub)
    assert isinstance(done.job, Job) and not done.reused
    assert done.job.status is JobStatus.QUEUED and done.job.tenant == "alice" and done.job.kind == "audit"
    assert blobs.exists(sub.inputs["model"]["sha256"])
    assert store.get(done.job.id, tenant="bob") is None
    assert store.get(done.job.id) == done.job and done.job.inputs == sub.inputs and done.job.error is None


def test_a_finished_twin_is_reused_unless_asked_not_to(env):
    store, blobs, settings = env
    first = submission.submit(store, blobs, settings, "alice", _submission(blobs)).job
    owner = "w1"
    assert store.claim(owner, 60, job_id=first.id).status == JobStatus.RUNNING
    assert store.succeed(first.id, owner, stored_report({"label": "genuine"}))
    twin = submission.submit(store, blobs, settings, "alice", _submission(blobs))
    assert twin.reused and twin.job.status is JobStatus.SUCCEEDED and twin.job.verdict == "genuine"
    fresh = submission.submit(store, blobs, settings, "alice", _submission(blobs, reuse=False))
    assert not fresh.reused and fresh.job.status is JobStatus.QUEUED
    other = submission.submit(store, blobs, settings, "bob", _submission(blobs))
    assert not other.reused  # dedupe never crosses tenants


def test_admission_raises_typed_errors(env):
    store, blobs, settings = env
    for _ in range(2):
        submission.submit(store, blobs, settings, "alice", _submission(blobs, reuse=False))
    with pytest.raises(QueueFull):
        submission.admit(store, settings, "bob")
    with pytest.raises(QueueFull):
        submission.submit(store, blobs, settings, "bob", _submission(blobs, b"other", reuse=False))
    small = Settings(data_dir=settings.data_dir, max_queued=10, max_tenant_jobs=2, min_free_mb=0)
    with pytest.raises(TenantLimit):
        submission.admit(store, small, "alice")
    full = Settings(data_dir=settings.data_dir, min_free_mb=10**12)
    with pytest.raises(submission.DiskFull):
        submission.admit(store, full, "alice")


def test_labels_need_probes(env):
    spec = parse_audit_spec({"group": "C4"})
    with pytest.raises(submission.InvalidSubmission) as info:
        submission.check_inputs(spec, {"model", "labels"})
    assert info.value.field == "labels"
    submission.check_inputs(spec, {"model", "probes", "labels"})


def test_every_status_change_is_checked(env):
    store, blobs, settings = env
    job = store.create(kind=JobKind.AUDIT, spec={}, inputs={}, timeout_s=60, max_attempts=2)
    with pytest.raises(ValueError):
        store.transition(job.id, [JobStatus.QUEUED], JobStatus.SUCCEEDED)
    assert store.claim("w", 60, job_id=job.id) is not None
    assert store.release(job.id, "w")
    got = store.get(job.id)
    assert got.status is JobStatus.QUEUED and got.attempts == 0 and got.owner is None
    assert store.cancel(job.id) and store.get(job.id).ready
    assert not store.release(job.id, "w")  # a cancelled job is never requeued


def test_cuda_is_accepted_only_where_a_worker_can_run_it(tmp_path, monkeypatch):
    """``device: cuda``: the operator's AUDIT_CUDA decides, else (auto) the local workers' host and queues, or yes
    with Celery (the GPU workers run elsewhere); refused with the field to fix."""
    cuda = parse_audit_spec({"group": "C4", "options": {"device": "cuda"}})
    auto = parse_audit_spec({"group": "C4"})
    submission.check_device(cuda, Settings(data_dir=tmp_path, cuda="1"))
    submission.check_device(cuda, Settings(data_dir=tmp_path, broker_url="redis://broker:6379/0"))
    submission.check_device(auto, Settings(data_dir=tmp_path, cuda="0"))
    with pytest.raises(submission.InvalidSubmission) as refused:
        submission.check_device(cuda, Settings(data_dir=tmp_path, cuda="0"))
    assert refused.value.field == "spec.options.device" and "AUDIT_CUDA" in refused.value.message
    monkeypatch.setattr(submission, "_HOST_CUDA", [True])  # a GPU host: auto follows the workers' queues
    submission.check_device(cuda, Settings(data_dir=tmp_path))
    with pytest.raises(submission.InvalidSubmission):
        submission.check_device(cuda, Settings(data_dir=tmp_path, worker_queues="cpu"))


def test_a_tenant_keeps_at_most_its_quota_duplicates_included(env):
    """AUDIT_MAX_TENANT_STORED counts every job a tenant keeps: a duplicate born succeeded counts like a queued job,
    another tenant's do not, and deleting one makes room."""
    from audit_service.jobs.store import TenantStoredLimit

    store, blobs, settings = env
    import dataclasses

    settings = dataclasses.replace(settings, max_tenant_stored=2, max_queued=10)
    first = submission.submit(store, blobs, settings, "a", _submission(blobs)).job
    assert store.claim("w", 30) is not None and store.succeed(first.id, store.get(first.id).owner, stored_report())
    twin = submission.submit(store, blobs, settings, "a", _submission(blobs))
    assert twin.reused
    with pytest.raises(TenantStoredLimit):
        submission.admit(store, settings, "a")
    with pytest.raises(TenantStoredLimit):
        submission.submit(store, blobs, settings, "a", _submission(blobs))
    submission.submit(store, blobs, settings, "b", _submission(blobs))  # another tenant's room is its own
    assert store.delete(twin.job.id, tenant="a")
    submission.submit(store, blobs, settings, "a", _submission(blobs))
