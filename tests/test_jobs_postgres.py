"""The job store on a real PostgreSQL (``tests/pg.py``): what several machines sharing one database rely
on. Separate processes (own connections, like separate hosts) claim, submit and create the schema at the
same time; leases expire; duplicates are found. ``tests/test_jobs.py`` runs the single-process store tests
on both SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from audit_service.jobs import JobKind, JobStatus, JobStore, QueueFull
from audit_service.jobs.store import TenantLimit
from conftest import ROOT
from reports import stored_report
from test_jobs import make


@pytest.fixture
def store(postgres_url) -> JobStore:
    s = JobStore(postgres_url)
    s.init_schema()
    return s


#: run in each child process: wait for the start signal (all processes connected), then act, print JSON
_CHILD = r"""
import json, os, sys, time
from audit_service.jobs import JobKind, JobStore, QueueFull
url, action, go, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
store = JobStore(url)
store.engine.connect().close()  # connected before the race starts
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.002)
out = []
if action == "claim":
    owner = f"proc-{os.getpid()}"
    while True:
        job = store.claim(owner, lease_s=30)
        if job is None:
            break
        out.append([job.id, job.owner, job.attempts])
        time.sleep(0.003)  # "work": lets the other processes in
elif action == "submit":
    for _ in range(n):
        try:
            store.create(kind=JobKind.AUDIT, spec={}, inputs={}, timeout_s=60, max_attempts=2, tenant="t",
                         max_queued=int(sys.argv[5]) or None, max_tenant_jobs=int(sys.argv[6]) or None)
            out.append("accepted")
        except QueueFull as exc:  # TenantLimit is a QueueFull
            out.append(type(exc).__name__)
elif action == "init_schema":
    store.init_schema()
    out.append("ok")
print(json.dumps(out), flush=True)
"""


def race(url: str, action: str, processes: int, tmp_path: Path, *args: object) -> list[list]:
    """Start ``processes`` children running ``action`` together; each one's JSON result."""
    go = tmp_path / f"go-{action}-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, url, action, str(go), *map(str, args)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(processes)]
    for p in procs:  # every child connected and waiting
        line = p.stdout.readline()
        assert line.strip() == "ready", (line, p.stderr.read())
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_processes_claiming_at_once_take_every_job_exactly_once(store, tmp_path):
    ids = {make(store).id for _ in range(30)}
    results = race(store.url, "claim", 4, tmp_path, 0)
    claimed = [c[0] for r in results for c in r]
    assert sorted(claimed) == sorted(ids)  # exactly once each
    assert sum(1 for r in results if r) >= 2, [len(r) for r in results]  # they really raced
    for r in results:
        for job_id, owner, attempts in r:
            row = store.get(job_id)
            assert row.status == JobStatus.RUNNING and row.owner == owner and attempts == row.attempts == 1
    assert store.claim("late", lease_s=30) is None


def test_threads_claiming_one_job_by_id(store):
    """The Celery path: a redelivered message means several workers claim the same job id."""
    job = make(store)
    wins: list[str] = []
    barrier = threading.Barrier(8)

    def worker(n: int) -> None:
        barrier.wait()
        if store.claim(f"w{n}", lease_s=30, job_id=job.id) is not None:
            wins.append(f"w{n}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and store.get(job.id).owner == wins[0]


def test_tenant_limit_holds_under_concurrent_processes(store, tmp_path):
    results = race(store.url, "submit", 4, tmp_path, 6, 0, 5)  # 24 tries, tenant limit 5
    flat = [x for r in results for x in r]
    assert flat.count("accepted") == 5 and flat.count("TenantLimit") == 19
    assert store.count_active("t") == 5


def test_global_queue_limit_holds_under_concurrent_processes(store, tmp_path):
    results = race(store.url, "submit", 4, tmp_path, 6, 7, 0)  # 24 tries, queue limit 7
    flat = [x for r in results for x in r]
    assert flat.count("accepted") == 7 and flat.count("QueueFull") == 17
    assert store.counts_by_status()["queued"] == 7


def test_limits_hold_under_concurrent_threads(store):
    outcome: list[str] = []
    barrier = threading.Barrier(8)

    def submit(tenant: str) -> None:
        barrier.wait()
        for _ in range(4):
            try:
                make(store, tenant=tenant, max_tenant_jobs=3, max_queued=5)
                outcome.append("accepted")
            except TenantLimit:
                outcome.append("tenant")
            except QueueFull:
                outcome.append("queue")

    threads = [threading.Thread(target=submit, args=(f"t{n % 2}",)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # two tenants of limit 3 each could take 6, the queue holds 5: exactly 5 in, neither tenant over 3
    assert outcome.count("accepted") == 5, outcome
    assert sorted([store.count_active("t0"), store.count_active("t1")]) == [2, 3]
    # running jobs count against the tenant, not the queue
    for _ in range(5):
        assert store.claim("w", lease_s=30)
    with pytest.raises(TenantLimit):
        make(store, tenant="t0" if store.count_active("t0") == 3 else "t1", max_tenant_jobs=3)


def test_a_lost_lease_is_retried_once_then_fails(store):
    job = make(store)  # max_attempts=2
    first = store.claim("machine-a:1:x", lease_s=30)
    assert first.id == job.id and first.attempts == 1
    assert store.recover_lost() == []  # lease still valid
    assert not store.heartbeat(job.id, "machine-b:1:x", 30)  # only the holder renews
    assert store.recover_lost(now=time.time() + 31) == [(job.id, "requeued")]  # a clock past the lease
    again = store.get(job.id)
    assert again.status == JobStatus.QUEUED and again.owner is None and again.dispatched_at is None
    assert not store.heartbeat(job.id, "machine-a:1:x", 30)  # the lost worker finds out
    assert not store.succeed(job.id, "machine-a:1:x", stored_report())
    second = store.claim("machine-b:1:x", lease_s=30)
    assert second.attempts == 2
    assert store.recover_lost(dead_owners=["machine-b:1:x"]) == [(job.id, "failed")]
    failed = store.get(job.id)
    assert failed.status == JobStatus.FAILED and failed.error.type == "worker_lost"
    assert failed.finished_at >= failed.started_at and failed.lease_expires_at is None


def test_recovery_from_two_machines_at_once_requeues_once(store):
    jobs = [make(store) for _ in range(10)]
    for _ in jobs:
        store.claim("dead-host:1:x", lease_s=30)
    past_the_leases = time.time() + 31
    outcomes: list = []
    barrier = threading.Barrier(4)

    def reaper() -> None:
        barrier.wait()
        outcomes.extend(store.recover_lost(now=past_the_leases))

    threads = [threading.Thread(target=reaper) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == sorted((j.id, "requeued") for j in jobs)


def test_dedupe_lookup_and_dispatch_bookkeeping(store):
    key = "ab" * 32
    assert store.find_finished(key, "default") is None
    job = make(store, dedupe_key=key)
    assert [j.id for j in store.undispatched(older_than=time.time() + 1, redispatch_after=0)] == [job.id]
    store.mark_dispatched(job.id)
    assert store.undispatched(older_than=time.time() + 1, redispatch_after=0) == []
    assert store.find_finished(key, "default") is None  # not finished yet
    store.claim("me", lease_s=30)
    report = stored_report({"label": "genuine"}, metrics={"di": 0.125, "nested": [1, 2.5, None, "ü"]})
    assert store.succeed(job.id, "me", report)
    source = store.find_finished(key, "default")
    assert source.id == job.id and json.loads(store.report_text(source.id)) == report.to_json()
    assert store.find_finished(key, "other-tenant") is None
    twin = store.create_reused(source=source, spec={"group": "C4"}, inputs={}, timeout_s=60,
                               tenant="default", queue="cpu", dedupe_key=key)
    assert twin.status == JobStatus.SUCCEEDED and twin.verdict == "genuine"
    assert store.report(twin.id).to_json() == report.to_json()
    assert store.find_finished(key, "default").id in {job.id, twin.id}
    assert store.delete(job.id) and store.report(job.id) is None and store.report(twin.id).to_json() == report.to_json()


def test_values_round_trip(store):
    before = time.time()
    job = make(store, queue="gpu")
    assert isinstance(job.created_at, float) and before <= job.created_at <= time.time()
    assert job.kind == JobKind.AUDIT.value and job.queue == "gpu" and job.spec == {"group": "C4"}
    store.claim("me", lease_s=30)
    assert store.heartbeat(job.id, "me", 30, progress=0.123456789, stage="x" * 500, sandbox_pid=2**31 - 1)
    row = store.get(job.id)
    assert row.progress == 0.123456789 and len(row.stage) == 128 and row.sandbox_pid == 2**31 - 1
    rows, total = store.list(status=JobStatus.RUNNING, kind=JobKind.AUDIT)
    assert total == 1 and rows[0].id == job.id
    assert store.running_owners() == ["me"]


def test_schema_created_by_many_processes_at_once(postgres_url, tmp_path):
    """Web and worker processes on several machines all call ``init_schema`` at start."""
    results = race(postgres_url, "init_schema", 4, tmp_path, 0)
    assert results == [["ok"]] * 4
    store = JobStore(postgres_url)
    make(store)
    # a database from before ``dedupe_key``/``dispatched_at`` existed gets them added, once
    with store.engine.begin() as conn:
        conn.execute(text("ALTER TABLE jobs DROP COLUMN dedupe_key"))
        conn.execute(text("ALTER TABLE jobs DROP COLUMN dispatched_at"))
    store.engine.dispose()
    assert race(postgres_url, "init_schema", 4, tmp_path, 0) == [["ok"]] * 4
    assert store.find_finished("x", "default") is None and len(store.undispatched(time.time() + 1, 0)) == 1
