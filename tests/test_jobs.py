"""Job store, states and blob store without a server: atomic claims, checked transitions, leases."""

from __future__ import annotations

import io
import threading

import pytest

from audit_service.jobs import (BlobStore, BlobTooLarge, Job, JobError, JobKind, JobStatus, JobStore, JobSummary,
                                QueueFull, Settings)
from audit_service.jobs.states import check_transition
from reports import stored_report


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path) -> JobStore:
    """The store on both backends: the embedded SQLite file and a real PostgreSQL (``tests/pg.py``)."""
    url = (f"sqlite:///{tmp_path / 'jobs.sqlite3'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    s = JobStore(url)
    s.init_schema()
    return s


def make(store: JobStore, **kw) -> Job:
    return store.create(kind=JobKind.AUDIT, spec={"group": "C4"}, inputs={}, timeout_s=60, max_attempts=2, **kw)


def test_new_jobs_are_queued_for_the_default_tenant(store):
    job = make(store)
    assert job.status == JobStatus.QUEUED and job.tenant == "default" and job.attempts == 0
    assert store.get(job.id, tenant="someone-else") is None
    assert store.list(tenant="default")[1] == 1 and store.list(tenant="other")[1] == 0


def test_two_workers_never_claim_the_same_job(store):
    ids = {make(store).id for _ in range(20)}
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        while True:
            job = store.claim(f"host:{n}:x", lease_s=30)
            if job is None:
                return
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)  # each exactly once


def test_transitions_are_checked():
    with pytest.raises(ValueError, match="Expected a transition"):
        check_transition(JobStatus.SUCCEEDED, JobStatus.RUNNING)
    check_transition(JobStatus.RUNNING, JobStatus.QUEUED)


def test_only_the_owner_can_finish_and_cancel_stops_the_heartbeat(store):
    job = make(store)
    store.claim("me", lease_s=30)
    assert not store.succeed(job.id, "someone-else", stored_report())
    assert store.heartbeat(job.id, "me", 30, progress=0.5, stage="sweep")
    assert store.get(job.id).progress == 0.5
    assert store.cancel(job.id)
    assert not store.heartbeat(job.id, "me", 30)  # the worker learns it lost the job
    assert not store.succeed(job.id, "me", stored_report())
    assert store.get(job.id).status == JobStatus.CANCELLED
    assert store.delete(job.id) and store.get(job.id) is None


def test_success_stores_the_report_and_verdict(store):
    job = make(store)
    store.claim("me", lease_s=30)
    report = stored_report({"label": "learned"})
    assert store.succeed(job.id, "me", report)
    done = store.get(job.id)
    assert isinstance(done, Job) and done.error is None
    assert done.status == JobStatus.SUCCEEDED and done.verdict == "learned" and done.progress == 1.0
    assert store.report(job.id).to_json() == report.to_json()
    assert store.durations()


def test_a_failed_job_reads_its_error_typed(store):
    job = make(store)
    store.claim("me", lease_s=30)
    assert store.fail(job.id, JobError("timeout", "too slow", "timeout_s"), owner="me")
    assert store.get(job.id).error == JobError("timeout", "too slow", "timeout_s")
    rows, _ = store.summaries()
    assert isinstance(rows[0], JobSummary) and not isinstance(rows[0], Job) and rows[0].error.type == "timeout"


def test_graceful_release_does_not_count_the_attempt(store):
    job = make(store)
    store.claim("me", lease_s=30)
    assert store.release(job.id, "me")
    again = store.get(job.id)
    assert again.status == JobStatus.QUEUED and again.attempts == 0


def test_bounded_queue(store):
    make(store, max_queued=2)
    make(store, max_queued=2)
    with pytest.raises(QueueFull):
        make(store, max_queued=2)


def test_blob_store_is_content_addressed(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    sha, size = blobs.put_bytes(b"hello")
    assert size == 5 and blobs.path(sha).read_bytes() == b"hello"
    assert blobs.put_bytes(b"hello") == (sha, size)
    with pytest.raises(BlobTooLarge):
        blobs.put_stream(io.BytesIO(b"x" * 100), max_bytes=10)
    assert [p.name for p in (tmp_path / "blobs").iterdir() if p.name.startswith(".upload")] == []
    with pytest.raises(ValueError):
        blobs.path("../../etc/passwd")


def test_a_stored_blob_is_never_replaced(tmp_path):
    """The same bytes uploaded again keep the file that is there (issue 17): a running sandbox's Landlock rule
    names that inode, and a replaced file made its model open fail with "Permission denied"."""
    blobs = BlobStore(tmp_path / "blobs")
    sha, _ = blobs.put_bytes(b"model bytes")
    before = blobs.path(sha).stat().st_ino
    staged, sha2, _ = blobs.stage(io.BytesIO(b"model bytes"))
    assert sha2 == sha
    blobs.adopt(staged, sha2)
    assert blobs.path(sha).stat().st_ino == before
    assert not staged.exists() and blobs.path(sha).read_bytes() == b"model bytes"


def test_settings_from_environment(tmp_path):
    s = Settings.from_env({"AUDIT_DATA_DIR": str(tmp_path), "AUDIT_MAX_QUEUED": "5", "AUDIT_LEASE_S": "2.5"})
    assert s.max_queued == 5 and s.lease_s == 2.5
    assert s.resolved_database_url == f"sqlite:///{tmp_path.resolve() / 'jobs.sqlite3'}"
    assert Settings.from_env({"AUDIT_DATABASE_URL": "postgresql://x/y"}).resolved_database_url == "postgresql://x/y"
    with pytest.raises(ValueError, match="AUDIT_WORKERS"):
        Settings.from_env({"AUDIT_WORKERS": "many"})


def test_claims_go_round_robin_across_tenants(store):
    """Tenant a queues 4 jobs, then b queues 2: claims alternate a, b, a, b, a, a (each tenant's oldest first),
    not first-come-first-served."""
    a = [make(store, tenant="a").id for _ in range(4)]
    b = [make(store, tenant="b").id for _ in range(2)]
    order = []
    while (job := store.claim("host:1:x", lease_s=30)) is not None:
        order.append(job.id)
        assert store.succeed(job.id, "host:1:x", {"card": 1})  # finished: no running job counts against a tenant
    assert order == [a[0], b[0], a[1], b[1], a[2], a[3]]


def test_a_tenant_with_a_running_job_waits_for_one_without(store):
    busy = make(store, tenant="busy").id
    queued_busy = make(store, tenant="busy").id
    other = make(store, tenant="other").id
    assert store.claim("host:1:x", lease_s=30).id == busy
    assert store.claim("host:2:x", lease_s=30).id == other  # busy has one running, other none
    assert store.claim("host:3:x", lease_s=30).id == queued_busy


def test_duplicates_refer_to_one_stored_report_which_outlives_its_first_holder(store):
    """Issue 19: a reused job stores a reference, not a copy; deleting the job that holds the text hands it to
    a duplicate, so every remaining duplicate still reads the same report."""
    from audit_service.jobs.store import reports
    from sqlalchemy import func, select

    job = store.create(kind=JobKind.AUDIT, spec={"group": "C4"}, inputs={}, timeout_s=60, max_attempts=1)
    claimed = store.claim("w", 30)
    report = stored_report(pad="x" * 100_000)
    assert store.succeed(claimed.id, "w", report)
    original = store.report_text(job.id)
    twins = [store.create_reused(source=store.get(job.id), spec={"group": "C4"}, inputs={},
                                 timeout_s=60, tenant="default", queue="default", dedupe_key="k").id
             for _ in range(20)]
    with store.engine.connect() as conn:
        stored = conn.execute(select(func.sum(func.length(reports.c.report_json)))).scalar()
    assert stored < len(original) + 20 * 100  # one copy and 20 small references
    assert all(store.report_text(t) == original for t in twins)
    # a duplicate of a duplicate refers to the job that holds the text, not to the duplicate (no chains)
    twin_of_twin = store.create_reused(source=store.get(twins[0]), spec={"group": "C4"}, inputs={}, timeout_s=60,
                                       tenant="default", queue="default", dedupe_key="k").id
    with store.engine.connect() as conn:
        refers = conn.execute(select(reports.c.report_json).where(reports.c.job_id == twin_of_twin)).scalar()
    assert refers == '{"$reused_from": ' + f'"{job.id}"}}'
    twins.append(twin_of_twin)
    assert store.delete(job.id)
    assert store.report_text(job.id) is None
    assert all(store.report_text(t) == original for t in twins)
    assert store.delete(twins[0]) and all(store.report_text(t) == original for t in twins[1:])
    assert not store.delete(twins[1], tenant="someone-else") and store.report_text(twins[1]) == original


def test_the_job_view_says_what_the_report_gate_said(store):
    """Issue 22: a borderline verdict under ``require_confident`` fails its gate; the job row keeps the report's
    own answer, so ``GET /audits/{id}`` says ``passed: false`` too (not the label alone, which would pass)."""
    import time as time_mod

    from audit_service.service.schemas import job_out

    job = store.create(kind=JobKind.AUDIT, spec={"group": "C4", "require_confident": True}, inputs={}, timeout_s=60,
                       max_attempts=1)
    claimed = store.claim("w", 30)
    verdict = {"label": "learned", "passed": False, "borderline": True, "require_confident": True}
    assert store.succeed(claimed.id, "w", stored_report(verdict))
    row = store.get(job.id)
    assert row.verdict == "learned" and row.passed is False
    assert job_out(row, time_mod.time()).passed is False


def test_list_summaries_and_streamed_reports(store, tmp_path):
    """Issue 19 on both backends: a job list reads summaries (the group's order from the finished report), never
    the spec; a report streams in slices, a duplicate's from its holder, byte for byte what ``report_text`` gives
    (escapes and non-ASCII included); deleting the holder hands the text on."""
    import json

    spec = {"group": {"name": "permutation", "generators": [[1, 0, 2]]}, "shifts": [], "options": {"n_probes": 5}}
    job = store.create(kind=JobKind.AUDIT, spec=spec, inputs={"probes": {"sha256": "p", "size_bytes": 1}},
                       timeout_s=60, max_attempts=1, dedupe_key="k")
    store.claim("me", 30)
    report = stored_report({"label": "genuine", "passed": True}, {"name": "permutation", "order": 2},
                           notes=['quote " backslash \\ é ü 漢'], pad="x" * 700_000)
    assert store.succeed(job.id, "me", report)
    rows, total = store.summaries(tenant="default")
    assert total == 1 and not hasattr(rows[0], "spec") and not hasattr(rows[0], "inputs")
    assert rows[0].spec_summary == {"group": {"name": "permutation", "order": 2}, "shifts": 0, "conditions": 2,
                                       "n_probes": 5, "device": None, "require": None}
    twin = store.create_reused(source=store.find_finished("k", "default"), spec=spec, inputs={}, timeout_s=60,
                               tenant="default", queue="cpu", dedupe_key="k")
    assert twin.spec_summary["group"]["order"] == 2  # the finished report's, not the spec's (unknown)
    for job_id in (job.id, twin.id):
        holder, size = store.report_source(job_id)
        body = b"".join(store.report_slices(holder, size=100_000))
        assert holder == job.id and len(body) == size and body.decode() == store.report_text(job_id)
        assert json.loads(body) == report.to_json()
    assert store.delete(job.id)
    holder, size = store.report_source(twin.id)
    assert holder == twin.id and json.loads(b"".join(store.report_slices(holder))) == report.to_json()


def test_an_older_sqlite_file_is_converted_to_free_space_on_delete(tmp_path):
    """A database made before deletes freed space (auto_vacuum none) is rebuilt once at startup (``open_checked``),
    after which deleting jobs shrinks the file instead of leaving it at its largest."""
    import sqlite3

    db = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(db) as conn:  # as an older release left it: auto_vacuum off, tables already there
        conn.execute("CREATE TABLE older (x TEXT)")
    store = JobStore(f"sqlite:///{db}")
    assert store.open_checked() is None
    assert sqlite3.connect(db).execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    ids = [store.create(kind=JobKind.AUDIT, spec={"group": "C4", "pad": "x" * 200_000}, inputs={}, timeout_s=60,
                        max_attempts=1).id for _ in range(20)]
    for job_id in ids:
        assert store.cancel(job_id)
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    full = db.stat().st_size
    for job_id in ids:
        assert store.delete(job_id)
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert full > 4_000_000 and db.stat().st_size < full / 10, (full, db.stat().st_size)


def test_write_back_rules_read_every_documented_form():
    """docs/deployment.md's forms: tenant:pattern, tenant:registry:pattern and tenant:runs:/RUN_ID (a run in any
    registry); a rule matches the name (or run) the model URI names, in the registry it names."""
    from audit_service.jobs.write_back import WriteBackConfigError, parse_rules, write_back_target

    rules = parse_rules("alice:runs:/abc*, bob:main:prod-*\ncarol:*-dev  # comment", "AUDIT_WRITE_BACK_RULES")
    assert [(r.tenant, r.registry, r.pattern) for r in rules] == [
        ("alice", "*", "runs:/abc*"), ("bob", "main", "prod-*"), ("carol", "*", "*-dev")]
    alice, bob, carol = rules
    assert alice.permits("alice", "main", write_back_target("runs:/abc123/model"))
    assert not alice.permits("alice", "main", write_back_target("runs:/xyz/model"))
    assert bob.permits("bob", "main", write_back_target("models:/prod-cnn/3"))
    assert not bob.permits("bob", "other", write_back_target("models:/prod-cnn/3"))
    assert carol.permits("carol", "any", write_back_target("models:/net-dev@champion"))
    assert not carol.permits("bob", "any", write_back_target("models:/net-dev/1"))
    with pytest.raises(WriteBackConfigError, match="entry 1"):
        parse_rules("alice:", "AUDIT_WRITE_BACK_RULES")


def test_the_worker_stores_the_sandbox_report_typed_or_fails_the_job_saying_why(tmp_path):
    """The worker reads the sandbox's report as the typed ``Report``: a whole one is stored (verdict, gate and
    reference profile on the job and in the JSON, the page rendered); one that does not match the models fails
    the job with ``invalid_report`` instead of storing what the service cannot serve."""
    import json

    from audit_service.jobs.pages import page_path
    from audit_service.jobs.worker import _settle

    settings = Settings(data_dir=tmp_path)
    store = JobStore(settings.resolved_database_url)
    store.init_schema()
    sandbox_report = stored_report({"label": "learned", "passed": False}).to_json()
    outcomes = {}
    cases = (("whole", sandbox_report), ("broken", {**sandbox_report, "verdict": "genuine"}),
             ("a list", [sandbox_report]), ("a string", "genuine"))
    for name, report in cases:
        job = make(store)
        store.claim("me", lease_s=30, job_id=job.id)
        workdir = tmp_path / name
        workdir.mkdir()
        (workdir / "result.json").write_text(json.dumps({"ok": True, "report": report}))
        outcomes[name] = (job.id, _settle(job, store, "me", workdir, 0, None, 1.0, 60.0, 0, settings))
    whole, outcome = outcomes["whole"]
    assert outcome.status == JobStatus.SUCCEEDED, outcome
    done = store.get(whole)
    assert (done.verdict, done.passed, done.error) == ("learned", False, None)
    assert store.report(whole).reference_profile is not None and page_path(tmp_path, whole).is_file()
    for name in ("broken", "a list", "a string"):  # a report that is not even an object fails the same way
        broken, outcome = outcomes[name]
        failed = store.get(broken)
        assert outcome.status == JobStatus.FAILED and failed.error.type == "invalid_report", (name, failed)
        assert store.report(broken) is None, name
    assert "verdict" in store.get(outcomes["broken"][0]).error.message
