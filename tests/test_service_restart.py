"""Restart safety and backpressure on a dedicated service: a full queue answers 429 + Retry-After;
stopping the service with jobs queued and starting it again runs every one of them."""

from __future__ import annotations

import json
import time

import pytest
import requests

from conftest import Service, settle, tiny_spec

pytestmark = pytest.mark.slow


def _submit(url: str, models: dict, seed: int) -> requests.Response:
    spec = tiny_spec(options={**tiny_spec()["options"], "seed": seed, "saliency": False, "jacobian_probes": 0})
    return requests.post(url + "/audit", files={"model": ("m.onnx", open(models["plain"], "rb"))},
                         data={"spec": json.dumps(spec)}, timeout=120)


def test_queue_full_then_restart_runs_every_queued_job(tmp_path, models, contract):
    data = tmp_path / "data"
    # web only: nothing takes jobs, so they stay queued
    web_only = Service(data, workers=0, web_workers=1, AUDIT_MAX_QUEUED=3).start()
    try:
        ids = []
        for seed in range(3):
            r = contract(_submit(web_only.url, models, seed))
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        full = contract(_submit(web_only.url, models, 99))
        assert full.status_code == 429
        assert int(full.headers["Retry-After"]) >= 1
        assert full.headers["Content-Type"] == "application/problem+json" and "queue is full" in full.json()["detail"]
        metrics = requests.get(web_only.url + "/metrics", timeout=10).text
        assert "audit_queue_depth 3.0" in metrics
    finally:
        assert web_only.stop() == 0

    restarted = Service(data, workers=1, web_workers=1, AUDIT_MAX_QUEUED=3).start()
    try:
        states = {i: job["status"] for i, job in settle(restarted.url, ids, timeout=240).items()}
        assert set(states.values()) == {"succeeded"}, states
    finally:
        restarted.stop()


def test_a_job_left_running_by_a_dead_worker_is_retried_once_then_failed(tmp_path):
    """The store's recovery rule, driven directly: lease expiry -> requeue (attempt 1) -> fail (attempt 2)."""
    from audit_service.jobs import JobKind, JobStatus, JobStore

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    store.init_schema()
    job = store.create(kind=JobKind.AUDIT, spec={"group": "C4"}, inputs={}, timeout_s=60, max_attempts=2)
    assert store.claim("host:1:dead", lease_s=30).attempts == 1
    assert store.recover_lost() == []  # the lease holds
    assert store.recover_lost(now=time.time() + 31) == [(job.id, "requeued")]  # a clock past the lease
    assert store.get(job.id).status == JobStatus.QUEUED
    assert store.claim("host:2:dead", lease_s=30).attempts == 2
    assert store.recover_lost(now=time.time() + 31) == [(job.id, "failed")]
    failed = store.get(job.id)
    assert failed.status == JobStatus.FAILED and failed.error.type == "worker_lost"
    assert "retried" in failed.error.message
