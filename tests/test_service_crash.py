"""Crash safety of the embedded mode: kill -9 the audit worker in the middle of an audit, or the whole
service; every accepted job still ends `succeeded` (or `failed` with a reason) after the restart —
none stays `running`, none disappears."""

from __future__ import annotations

import json
import os
import signal

import pytest
import requests

from audit_service.jobs import Job
from conftest import Service, settle, tiny_spec
from polling import wait_for

pytestmark = pytest.mark.slow



def submit(url: str, models: dict, seed: int) -> str:
    spec = tiny_spec(options={**tiny_spec()["options"], "seed": seed, "n_probes": 16, "ig_steps": 8})
    r = requests.post(url + "/audit", files={"model": ("m.onnx", open(models["plain"], "rb"))},
                      data={"spec": json.dumps(spec), "reuse": "false"}, timeout=120)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def running_row(store, job_ids: str | list[str], timeout: float = 120.0) -> Job:
    """The first of ``job_ids`` seen running in its sandbox; fails once none is left queued or running."""
    ids = [job_ids] if isinstance(job_ids, str) else list(job_ids)

    def started() -> Job | None:
        rows = [store.get(i) for i in ids]
        assert any(r.status in ("queued", "running") for r in rows), rows  # all finished: none to catch
        return next((r for r in rows if r.status == "running" and r.sandbox_pid), None)

    return wait_for(started, timeout, 0.1, f"one of jobs {ids} to start")


def test_kill_9_of_the_audit_worker_mid_audit_retries_the_job(tmp_path, models):
    from audit_service.jobs.store import JobStore

    svc = Service(tmp_path / "data", workers=1, web_workers=1).start()
    try:
        store = JobStore(f"sqlite:///{svc.data_dir.resolve() / 'jobs.sqlite3'}")
        ids = [submit(svc.url, models, seed) for seed in range(2)]
        row = running_row(store, ids[0])
        worker_pid = int(row.owner.split(":")[1])
        assert worker_pid != svc.proc.pid
        os.kill(worker_pid, signal.SIGKILL)  # the worker (and with it its sandbox child) dies mid-audit
        jobs = settle(svc.url, ids)
        assert [j["status"] for j in jobs.values()] == ["succeeded", "succeeded"], jobs
        assert jobs[ids[0]]["attempts"] == 2  # taken back from the dead worker and run again
        assert requests.get(svc.url + "/healthz", timeout=10).status_code == 200
    finally:
        svc.stop()


def test_kill_9_of_the_whole_service_loses_no_job(tmp_path, models):
    from audit_service.jobs.store import JobStore

    data = tmp_path / "data"
    svc = Service(data, workers=1, web_workers=1, new_session=True).start()
    store = JobStore(f"sqlite:///{data.resolve() / 'jobs.sqlite3'}")
    ids = [submit(svc.url, models, seed) for seed in range(10, 14)]
    running_row(store, ids)  # whichever is mid-audit (a small one may finish before the first poll)
    svc.kill_all()  # serve, gunicorn, the worker, its sandbox: all at once, no clean-up
    states = {i: store.get(i).status for i in ids}
    assert "running" in states.values() and len(states) == 4  # accepted, and one caught mid-audit

    restarted = Service(data, workers=1, web_workers=1).start()
    try:
        jobs = settle(restarted.url, ids)
        for job in jobs.values():
            assert job["status"] == "succeeded" or (job["status"] == "failed" and job["error"]["message"]), job
        assert sum(j["status"] == "succeeded" for j in jobs.values()) == 4, jobs
        listing = requests.get(restarted.url + "/audits", params={"limit": 100}, timeout=30).json()
        assert {j["id"] for j in listing["items"]} == set(ids)
    finally:
        restarted.stop()
