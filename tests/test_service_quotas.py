"""Issue 19, what a tenant stores and holds, against a real ``audit-service serve`` (gunicorn, real SQLite file,
real HTTP): list pages carry summaries, duplicates count against the tenant's quota and deleting shrinks the
file, ``device: cuda`` without CUDA is a 422 at submission, one address's idle connections leave ``/healthz``
answered, and the web workers' memory after 60 concurrent report downloads. Each test prints its figures."""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import requests

from builders import rank1_onnx
from conftest import Service, tiny_spec
from polling import wait_for
from reports import stored_report

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
#: a rank-1 model on 20,000 features with saliency examples: a report of about 0.1 MiB
RANK1_SPEC = {"group": {"name": "translation", "order": 2}, "shifts": [],
              "options": {"n_probes": 2, "n_noise_probes": 2, "ig_steps": 2, "jacobian_probes": 0, "bootstrap": 10,
                          "probe_chunk": 2}}


def _submit(url: str, model: Path, spec: dict, form: dict | None = None, **params: object) -> requests.Response:
    return requests.post(url + "/audit", files={"model": ("m.onnx", model.read_bytes())},
                         data={"spec": json.dumps(spec), **(form or {})}, params=params, timeout=240)


def _db_bytes(db: Path) -> int:
    """The database file once the WAL is folded in and truncated (the WAL grows per commit, then resets)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.exists())


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    data = tmp_path_factory.mktemp("quotas") / "data"
    s = Service(data, workers=1, web_workers=2, AUDIT_MAX_TENANT_STORED=202, AUDIT_JOB_TIMEOUT_S=300,
                AUDIT_MAX_WAIT_S=240,
                AUDIT_CUDA="0").start()  # no CUDA worker, even on a GPU host (the device test expects a 422)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def finished(svc, tmp_path_factory) -> dict:
    """One finished audit with a large report (the rank-1 model, saliency examples kept)."""
    model = rank1_onnx(tmp_path_factory.mktemp("rank1") / "rank1.onnx", 20_000)
    r = _submit(svc.url, model, RANK1_SPEC, wait=240)
    assert r.status_code == 200, r.text[:2000]
    job_id = r.headers["Location"].rsplit("/", 1)[1]
    report = requests.get(f"{svc.url}/audits/{job_id}/report", timeout=60).content
    return {"id": job_id, "model": model, "report_bytes": len(report)}


# ----------------------------------------------------------------------------- list pages
def test_list_items_are_summaries_of_large_specs(svc, contract):
    """100 jobs with 60 KiB specs (a permutation group's generators, under the 64 KiB cap) and 3 older rows with
    1 MiB specs stored before summaries existed: ``GET /audits?limit=100`` carries a few hundred bytes per job
    (before: each item carried its whole spec, the sum of the job views), and still names each job's group."""
    from audit_service.jobs.states import JobKind
    from audit_service.jobs.store import JobStore, jobs

    store = JobStore(f"sqlite:///{svc.data_dir / 'jobs.sqlite3'}")
    generators = [[(i + k) % 64 for i in range(64)] for k in range(1, 250)]
    spec = {**tiny_spec({"name": "permutation", "generators": generators}), "require": ["genuine"]}
    assert 50_000 < len(json.dumps(spec)) < 64 * 1024
    # on a queue no worker of this service takes: they stay queued while the test lists them
    ids = [store.create(kind=JobKind.AUDIT, spec=spec, inputs={}, timeout_s=60, max_attempts=1, queue="archive").id
           for _ in range(100)]
    old = [store.create(kind=JobKind.AUDIT, spec={**tiny_spec("D4"), "pad": "x" * MiB}, inputs={}, timeout_s=60,
                        max_attempts=1, queue="archive").id for _ in range(3)]
    with store.engine.begin() as conn:  # as rows written before this release: no summary
        conn.execute(jobs.update().where(jobs.c.id.in_(old)).values(spec_summary=None))
    try:
        times, page = [], None
        for _ in range(5):
            start = time.perf_counter()
            page = contract(requests.get(f"{svc.url}/audits?limit=100", timeout=60))
            times.append(time.perf_counter() - start)
        assert page.status_code == 200
        items = page.json()["items"]
        full = sum(len(requests.get(f"{svc.url}/audits/{i}", timeout=60).content) for i in
                   [j["id"] for j in items])
        print(f"GET /audits?limit=100: {len(page.content)} bytes, median {sorted(times)[2] * 1000:.0f} ms; "
              f"the same 100 jobs as whole job views (what an item carried before): {full} bytes")
        assert len(items) == 100 and len(page.content) < 100 * 1024, len(page.content)
        assert full > 50 * len(page.content)
        by_id = {j["id"]: j for j in items}
        assert by_id[ids[-1]]["spec"] == {"group": {"name": "permutation", "order": None}, "shifts": 0,
                                          "conditions": 1, "n_probes": 8, "device": None,
                                          "require": ["genuine"]}, by_id[ids[-1]]["spec"]
        assert by_id[old[0]]["spec"]["group"] == {"name": "D4", "order": 8}  # summarised from the old row's spec
        assert "inputs" not in by_id[ids[-1]] and "timings" in by_id[ids[-1]]
        assert sorted(times)[2] < 1.0, times
    finally:
        with store.engine.begin() as conn:
            conn.execute(jobs.delete().where(jobs.c.id.in_(ids + old)))


# ----------------------------------------------------------------------------- duplicates and deletes
def test_duplicates_count_against_the_quota_and_deleting_shrinks_the_file(svc, finished, contract):
    """200 duplicates of an audit with a ~0.1 MiB report: the file grows by small rows only, the tenant's quota
    (AUDIT_MAX_TENANT_STORED=202 here: the original, 200 duplicates and one more) counts them and answers 429
    ``tenant-quota`` past it, and deleting them all gives the space back (incremental auto-vacuum); before, the
    file stayed at its largest after the deletes."""
    db = svc.data_dir / "jobs.sqlite3"
    before = _db_bytes(db)
    ids = []
    start = time.monotonic()
    for _ in range(200):
        r = _submit(svc.url, finished["model"], RANK1_SPEC)
        assert r.status_code in (200, 202) and r.json()["status"] == "succeeded", r.text[:500]
        ids.append(r.json()["id"])
    took = time.monotonic() - start
    after_dupes = _db_bytes(db)
    extra = _submit(svc.url, finished["model"], RANK1_SPEC, {"reuse": "false"})  # the 202nd job: the last one allowed
    assert extra.status_code == 202, extra.text
    extra_id = extra.json()["id"]
    refused = contract(_submit(svc.url, finished["model"], RANK1_SPEC))
    assert refused.status_code == 429 and refused.json()["type"].endswith("tenant-quota"), refused.text
    assert "AUDIT_MAX_TENANT_STORED=202" in refused.json()["detail"] and "DELETE" in refused.json()["detail"]
    wait_for(lambda: requests.get(f"{svc.url}/audits/{extra_id}", timeout=30).json()["status"] in
             ("succeeded", "failed"), 300, 0.5, what=f"the extra audit {extra_id} to finish")  # deletable then
    for job_id in [finished["id"], *ids, extra_id]:
        assert requests.delete(f"{svc.url}/audits/{job_id}", timeout=30).status_code == 204
    after_delete = _db_bytes(db)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        free_pages = conn.execute("PRAGMA freelist_count").fetchone()[0]
        mode = conn.execute("PRAGMA auto_vacuum").fetchone()[0]
    print(f"report {finished['report_bytes']} bytes; database {before} bytes before, {after_dupes} after 200 "
          f"duplicates ({took:.1f} s), {after_delete} after deleting them all (free pages left {free_pages})")
    assert mode == 2  # incremental
    assert after_dupes - before < 200 * 4096 + 2 * MiB, (before, after_dupes)
    assert after_delete < after_dupes - finished["report_bytes"] / 2, (after_dupes, after_delete)
    assert free_pages < 64, free_pages
    again = _submit(svc.url, finished["model"], RANK1_SPEC)  # room again
    assert again.status_code == 202, again.text


# ----------------------------------------------------------------------------- device
def test_cuda_on_a_host_without_cuda_is_refused_at_submission(svc, finished, contract):
    """``device: cuda`` where no worker has a GPU: a 422 naming spec.options.device, no job (before: accepted, and
    the job failed when it ran)."""
    spec = {**RANK1_SPEC, "options": {**RANK1_SPEC["options"], "device": "cuda"}}
    listed = requests.get(f"{svc.url}/audits?limit=1", timeout=30).json()["total"]
    r = contract(_submit(svc.url, finished["model"], spec))
    assert r.status_code == 422 and r.json()["field"] == "spec.options.device", r.text
    assert "no CUDA GPU" in r.json()["detail"] and "AUDIT_CUDA" in r.json()["detail"]
    assert requests.get(f"{svc.url}/audits?limit=1", timeout=30).json()["total"] == listed


# ----------------------------------------------------------------------------- memory of the web workers
def _web_worker_pids(svc: Service) -> list[int]:
    """The gunicorn workers: children of gunicorn's master, itself a child of ``serve``."""
    def children(pid: int) -> list[int]:
        with contextlib.suppress(OSError):
            return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        return []

    masters = [p for p in children(svc.proc.pid) if b"gunicorn" in Path(f"/proc/{p}/cmdline").read_bytes()]
    return [w for m in masters for w in children(m)]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _stored_report(svc: Service, pad_bytes: int) -> str:
    """A succeeded audit whose stored report carries ``pad_bytes`` more (written through the store, as a worker
    does; on a queue no worker takes, so the service's own worker leaves it alone). Its id."""
    from audit_service.jobs.states import JobKind, JobStatus
    from audit_service.jobs.store import JobStore

    store = JobStore(f"sqlite:///{svc.data_dir / 'jobs.sqlite3'}")
    job = store.create(kind=JobKind.AUDIT, spec=tiny_spec("C4"), inputs={}, timeout_s=60, max_attempts=1,
                       queue="archive")
    assert store.transition(job.id, [JobStatus.QUEUED], JobStatus.RUNNING, fields={"owner": "test"})
    report = stored_report({"label": "genuine", "passed": True}, notes=["x" * pad_bytes])
    assert store.succeed(job.id, "test", report)
    return job.id


def test_web_worker_memory_after_60_concurrent_report_downloads(svc):
    """60 clients download a 6 MiB stored report at once, each reading slowly, three rounds: the web workers'
    RSS at the peak and after they closed stays within a bound (the report is streamed from the database in
    256 KiB slices; before, each download held the whole text)."""
    pids = _web_worker_pids(svc)
    assert len(pids) == 2, pids
    job_id = _stored_report(svc, 6 * MiB)
    assert len(requests.get(f"{svc.url}/audits/{job_id}/report", timeout=120).content) > 6 * MiB  # warm
    before = {p: _rss_mib(p) for p in pids}
    errors: list[str] = []
    peak = dict(before)

    def download() -> None:
        try:
            with requests.get(f"{svc.url}/audits/{job_id}/report", timeout=120, stream=True) as r:
                if r.status_code != 200:
                    errors.append(str(r.status_code))
                time.sleep(1.0)  # a slow reader: the answer waits in the worker meanwhile
                size = sum(len(chunk) for chunk in r.iter_content(65536))
                if size < 6 * MiB:
                    errors.append(f"{size} bytes")
        except requests.RequestException as exc:
            errors.append(str(exc))

    for _ in range(3):
        clients = [threading.Thread(target=download) for _ in range(60)]
        for c in clients:
            c.start()
        while any(c.is_alive() for c in clients):
            peak = {p: max(peak[p], _rss_mib(p)) for p in pids}
            time.sleep(0.05)
    after: dict[int, float] = {}

    def given_back() -> bool:  # the workers free a closed download's memory soon, not at once
        after.update({p: _rss_mib(p) for p in pids})
        return sum(after.values()) - sum(before.values()) < 64

    wait_for(given_back, 10, 0.2, lambda: f"the web workers to give memory back (before {before}, now {after})")
    grown, peak_grown = (sum(after.values()) - sum(before.values()), sum(peak.values()) - sum(before.values()))
    print(f"web workers RSS before {sum(before.values()):.0f} MiB, peak +{peak_grown:.0f} MiB, after 180 "
          f"downloads of a 6 MiB report (60 at once) {sum(after.values()):.0f} MiB (+{grown:.0f} MiB)")
    assert not errors, errors[:5]
    assert peak_grown < 120 and grown < 64, (before, peak, after)


# ----------------------------------------------------------------------------- connections
def _idle_connections(url: str, n: int) -> list[socket.socket]:
    """``n`` kept-alive connections, each after one answered ``/healthz``: idle, waiting for a next request."""
    host, port = url.split("//", 1)[1].split(":")
    conns = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        conns.append(s)
    for s in conns:
        with contextlib.suppress(OSError):
            s.recv(4096)
    return conns


def _still_open(conns: list[socket.socket]) -> int:
    """How many the server still holds: after what it sent is drained, no end-of-file (nor reset) yet."""
    open_ = 0
    for s in conns:
        s.setblocking(False)
        try:
            while s.recv(65536):
                pass
        except BlockingIOError:
            open_ += 1
        except OSError:
            pass
    return open_


def _healthz_while_idle(tmp_path: Path, cap: int) -> tuple[list[float], int]:
    (tmp_path / f"conn-{cap}").mkdir()
    svc = Service(tmp_path / f"conn-{cap}" / "data", workers=0, web_workers=2, AUDIT_MAX_CLIENT_CONNECTIONS=cap,
                  AUDIT_HEADER_TIMEOUT_S=30).start()
    conns: list[socket.socket] = []
    try:
        conns = _idle_connections(svc.url, 2000)
        times = []
        for _ in range(20):
            start = time.perf_counter()
            try:
                ok = requests.get(svc.url + "/healthz", timeout=5).status_code == 200
            except requests.RequestException:
                ok = False
            times.append(time.perf_counter() - start if ok else float("inf"))
        return times, _still_open(conns)
    finally:
        for s in conns:
            s.close()
        svc.stop()


def test_healthz_answers_while_2000_idle_connections_are_open(tmp_path):
    """2,000 kept-alive connections from one address, idle after one request each, then 20 fresh ``/healthz``
    requests: without a per-address cap every idle one stays held; with AUDIT_MAX_CLIENT_CONNECTIONS=64 each
    worker keeps at most 64 of them and the fresh requests are answered in milliseconds."""
    uncapped, held_uncapped = _healthz_while_idle(tmp_path, 0)
    capped, held_capped = _healthz_while_idle(tmp_path, 64)
    fmt = lambda ts: f"median {sorted(ts)[10] * 1000:.1f} ms, max {max(ts) * 1000:.1f} ms"  # noqa: E731
    print(f"/healthz with 2,000 idle connections: no cap {fmt(uncapped)} ({held_uncapped} held); cap 64 per "
          f"worker {fmt(capped)} ({held_capped} held)")
    assert held_capped <= 2 * 64, held_capped
    assert held_uncapped > 1000, held_uncapped  # the cap is what closes them, not a timeout
    assert max(capped) < 1.0, capped
