"""Issue 8, disk and size attacks against a real ``audit-service serve`` on a real SQLite file: the rank-1 report
bomb, rejected uploads, blob garbage on delete, a full disk (a real tmpfs), and damaged databases that ``serve``
must refuse to start on."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from builders import rank1_onnx
from conftest import ROOT, Service, free_port, settle, tiny_spec
from polling import wait_for
from reports import stored_report

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
FAST = {**tiny_spec()["options"], "saliency": False, "jacobian_probes": 0}


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _submit(url: str, model: bytes | Path, spec: dict | None = None, probes: bytes | None = None,
            labels: bytes | None = None, form: dict | None = None, **params: object) -> requests.Response:
    data = model.read_bytes() if isinstance(model, Path) else model
    files = {"model": ("m.onnx", data)}
    if probes is not None:
        files["probes"] = ("p.npy", probes)
    if labels is not None:
        files["labels"] = ("y.npy", labels)
    return requests.post(url + "/audit", files=files,
                         data={"spec": json.dumps(spec or tiny_spec(options=FAST)), **(form or {})},
                         params=params, timeout=240)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    data = tmp_path_factory.mktemp("disk") / "data"
    s = Service(data, workers=1, web_workers=1, AUDIT_JOB_TIMEOUT_S=300, AUDIT_MAX_WAIT_S=240).start()
    yield s
    s.stop()


# ----------------------------------------------------------------------------- bounded reports
def test_the_rank1_report_bomb_makes_a_bounded_report(svc, tmp_path, contract):
    """A ~160-byte ONNX model on (N, D) inputs: the report no longer grows with D (before: 20 MB at D = 10^6,
    138 MiB at 6 x 10^6); the examples are downsampled and the JSON is served as stored."""
    spec = {"group": {"name": "translation", "order": 2}, "shifts": [],
            "options": {"n_probes": 2, "n_noise_probes": 2, "ig_steps": 2, "jacobian_probes": 0, "bootstrap": 10,
                        "probe_chunk": 2}}
    sizes = {}
    for features in (100_000, 1_000_000):
        model = rank1_onnx(tmp_path / f"rank1-{features}.onnx", features)
        assert model.stat().st_size < 256
        r = contract(_submit(svc.url, model, spec, wait=240))
        assert r.status_code == 200, r.text[:2000]
        job_id = r.headers["Location"].rsplit("/", 1)[1]
        report = contract(requests.get(f"{svc.url}/audits/{job_id}/report", timeout=60))
        assert report.status_code == 200 and report.headers["Content-Type"].startswith("application/json")
        sizes[features] = len(report.content)
        body = report.json()
        assert body["saliency_examples"], "the examples are kept, only smaller"
        assert all(len(e["map_x"]) <= 48 * 48 for e in body["saliency_examples"])
    assert max(sizes.values()) < 2 * MiB, sizes
    assert abs(sizes[1_000_000] - sizes[100_000]) < 0.1 * sizes[100_000], sizes  # independent of D


def test_report_pages_are_bytes_in_the_web_tier(svc, tmp_path):
    """Issue 19: the HTML page of the rank-1 report (saliency examples drawn as 2,304-bar charts) is rendered by the
    worker when the job finishes; four clients fetching it at once leave /healthz answered within a second
    (before: 78 s unanswered, the page drawn again by each GET inside the web worker's event loop)."""
    import threading

    spec = {"group": {"name": "translation", "order": 2}, "shifts": [],
            "options": {"n_probes": 2, "n_noise_probes": 2, "ig_steps": 2, "jacobian_probes": 0, "bootstrap": 10,
                        "probe_chunk": 2}}
    r = _submit(svc.url, rank1_onnx(tmp_path / "rank1-page.onnx", 2304), spec, wait=240)
    assert r.status_code == 200, r.text[:1000]
    job_id = r.headers["Location"].rsplit("/", 1)[1]
    assert (svc.data_dir / "pages" / f"{job_id}.html").is_file()
    pages: list[int] = []

    def fetch() -> None:
        for _ in range(3):
            pages.append(requests.get(f"{svc.url}/audits/{job_id}/report.html", timeout=120).status_code)

    clients = [threading.Thread(target=fetch) for _ in range(4)]
    for c in clients:
        c.start()
    worst = 0.0
    while any(c.is_alive() for c in clients):
        start = time.monotonic()
        assert requests.get(svc.url + "/healthz", timeout=30).status_code == 200
        worst = max(worst, time.monotonic() - start)
        time.sleep(0.05)
    for c in clients:
        c.join()
    assert pages == [200] * 12 and worst < 1.0, (pages, worst)


def test_duplicates_do_not_copy_the_report(svc, models):
    """Issue 19: a resubmission answered from a finished audit refers to its report: 60 duplicates of an audit
    with a ~0.1 MiB report grow the database by far less than one copy each (before: a full copy each)."""
    probes = _npy(np.random.default_rng(11).random((16, 1, 12, 12), dtype=np.float32))
    spec = tiny_spec("C4", options={**FAST, "n_probes": 16, "saliency": True, "ig_steps": 2})
    first = _submit(svc.url, models["plain2"], spec=spec, probes=probes, wait=240)
    assert first.status_code == 200, first.text
    report = requests.get(svc.url + first.headers["Location"] + "/report", timeout=60).content
    db = svc.data_dir / "jobs.sqlite3"

    def db_bytes() -> int:  # the database file once the WAL is folded in (the WAL grows per commit, then resets)
        import sqlite3

        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute("PRAGMA wal_checkpoint(FULL)")
        return db.stat().st_size

    before = db_bytes()
    ids = [first.headers["Location"].rsplit("/", 1)[1]]
    for _ in range(60):
        r = _submit(svc.url, models["plain2"], spec=spec, probes=probes)
        assert r.status_code in (200, 202) and r.json()["status"] == "succeeded", r.text
        ids.append(r.json()["id"])
    grown = db_bytes() - before
    print(f"60 duplicates grew the database by {grown} bytes (report {len(report)} bytes)")
    assert grown < 60 * len(report) / 4, (grown, len(report))
    assert requests.get(f"{svc.url}/audits/{ids[-1]}/report", timeout=60).content == report
    for job_id in ids:  # the original first: its report lives on in the duplicates until the last goes
        assert requests.delete(f"{svc.url}/audits/{job_id}", timeout=30).status_code == 204
        if job_id != ids[-1]:
            assert requests.get(f"{svc.url}/audits/{ids[-1]}/report", timeout=60).content == report


# ----------------------------------------------------------------------------- rejected uploads, delete
def test_rejected_uploads_leave_nothing_on_disk(svc, models, contract):
    data = svc.data_dir
    before = _files(data / "blobs")
    probes = np.random.default_rng(5).random((8, 1, 12, 12), dtype=np.float32)
    rejected = [
        _submit(svc.url, b"\x00not a model" * 90_000),                                       # model check
        _submit(svc.url, models["plain"], tiny_spec({"name": "translation", "order": 2, "axis": 9}, options=FAST),
                probes=_npy(probes)),                                                        # spec vs shape
        _submit(svc.url, models["plain"], probes=_npy(probes[:, :, :5, :5])),                # probes vs model
        _submit(svc.url, models["plain"], probes=_npy(probes), labels=_npy(np.full(8, 99))),  # labels range
    ]
    for r in rejected:
        contract(r)
        assert r.status_code == 422, r.text
    assert _files(data / "blobs") == before, "a rejected upload stayed in the blob store"
    assert _files(data / "uploads") == set() and _files(data / "validate") == set()


def test_delete_removes_blobs_no_other_job_refers_to(svc, models, contract):
    rng = np.random.default_rng(11)
    p1, p2 = (_npy(rng.random((8, 1, 12, 12), dtype=np.float32)) for _ in range(2))
    a = contract(_submit(svc.url, models["plain2"], probes=p1, form={"reuse": "false"}))
    b = contract(_submit(svc.url, models["plain2"], probes=p2, form={"reuse": "false"}))
    assert a.status_code == b.status_code == 202, (a.text, b.text)
    a, b = a.json(), b.json()
    settle(svc.url, [a["id"], b["id"]])
    blobs = svc.data_dir / "blobs"
    sha = {k: a["inputs"][k]["sha256"] for k in ("model", "probes")} | {"probes2": b["inputs"]["probes"]["sha256"]}
    assert all((blobs / s[:2] / s).is_file() for s in sha.values())

    assert requests.delete(f"{svc.url}/audits/{a['id']}", timeout=30).status_code == 204
    assert not (blobs / sha["probes"][:2] / sha["probes"]).exists(), "a's probes are referenced by no job"
    assert (blobs / sha["model"][:2] / sha["model"]).is_file(), "the model is shared with b"
    assert requests.delete(f"{svc.url}/audits/{b['id']}", timeout=30).status_code == 204
    assert not (blobs / sha["model"][:2] / sha["model"]).exists()
    assert not (blobs / sha["probes2"][:2] / sha["probes2"]).exists()


# ----------------------------------------------------------------------------- a full disk
@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "data"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to fill a disk for real ({r.stderr.strip() or r.returncode}); "
                    f"needs root or CAP_SYS_ADMIN")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: Path, leave_mb: float) -> Path:
    """Write ``path/filler`` until less than ``leave_mb`` MiB are free (or the disk is full)."""
    filler = path / "filler"
    chunk = b"\xa5" * (256 * 1024)
    with open(filler, "ab") as fh:
        try:
            while True:
                st = os.statvfs(path)
                if st.f_bavail * st.f_frsize < leave_mb * MiB:
                    break
                fh.write(chunk)
                fh.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_answers_507_and_the_service_recovers_by_itself(tmpfs, models, contract):
    svc = Service(tmpfs, workers=0, web_workers=1, AUDIT_MIN_FREE_MB=4).start()
    try:
        probes = np.random.default_rng(3).random((8, 1, 12, 12), dtype=np.float32)
        first = contract(_submit(svc.url, models["plain"], probes=_npy(probes)))
        assert first.status_code == 202, first.text
        assert requests.get(svc.url + "/readyz", timeout=10).status_code == 200

        # above the threshold, but the upload itself does not fit: ENOSPC while staging -> 507, nothing left
        filler = _fill(tmpfs, leave_mb=6)
        big = _npy(np.random.default_rng(4).random((2_000_000,), dtype=np.float32))  # 8 MB
        r = contract(_submit(svc.url, models["plain"], probes=big))
        assert r.status_code == 507, r.text
        assert r.headers["Content-Type"] == "application/problem+json" and "disk is full" in r.json()["detail"]
        assert _files(tmpfs / "uploads") == set()

        # below the threshold: not ready, and submissions are refused before anything is read
        _fill(tmpfs, leave_mb=0)
        ready = requests.get(svc.url + "/readyz", timeout=10)
        assert ready.status_code == 503 and "AUDIT_MIN_FREE_MB" in ready.json()["checks"]["disk"], ready.text
        r = contract(_submit(svc.url, models["plain"], probes=_npy(probes[:4])))
        assert r.status_code == 507 and int(r.headers["Retry-After"]) > 0, r.text
        assert requests.get(f"{svc.url}/audits/{first.json()['id']}", timeout=10).status_code == 200

        # space comes back: ready again, accepts again, nothing was lost
        filler.unlink()
        assert requests.get(svc.url + "/readyz", timeout=10).status_code == 200
        again = contract(_submit(svc.url, models["plain"], probes=_npy(probes[:4])))
        assert again.status_code == 202, again.text
        listed = requests.get(svc.url + "/audits", timeout=10).json()
        assert {j["id"] for j in listed["items"]} == {first.json()["id"], again.json()["id"]}
    finally:
        svc.stop()


def test_a_worker_that_meets_a_full_disk_goes_on_once_space_is_back(tmpfs, models):
    """Issue 17: a full disk while an audit runs. The sandbox is still killed at its timeout (its exit status
    comes from waitpid, not from a file the fork server must write), what cannot be recorded is retried, and
    once space is back the stuck job ends with its reason and the next job runs, with no restart."""
    svc = Service(tmpfs, workers=1, web_workers=1, AUDIT_MIN_FREE_MB=4, AUDIT_LEASE_S=4, AUDIT_MAX_ATTEMPTS=2).start()
    try:
        stuck = _submit(svc.url, models["hang"].read_bytes(), spec=tiny_spec("flip", options=FAST),
                        form={"timeout_s": "8"})
        assert stuck.status_code == 202, stuck.text
        stuck_id = stuck.json()["id"]
        wait_for(lambda: requests.get(f"{svc.url}/audits/{stuck_id}", timeout=10).json()["status"] == "running", 60,
                 0.2, "the stuck job to start")
        filler = _fill(tmpfs, leave_mb=0)
        time.sleep(12)  # the job's timeout passes while nothing can be written
        filler.unlink()
        probes = np.random.default_rng(5).random((8, 1, 12, 12), dtype=np.float32)
        fresh = _submit(svc.url, models["plain"], probes=_npy(probes), spec=tiny_spec("flip", options=FAST))
        assert fresh.status_code == 202, fresh.text
        jobs = settle(svc.url, [stuck_id, fresh.json()["id"]], timeout=150)
        assert jobs[stuck_id]["status"] == "failed", jobs[stuck_id]
        assert jobs[stuck_id]["error"]["type"] in ("timeout", "worker_lost"), jobs[stuck_id]
        assert jobs[fresh.json()["id"]]["status"] == "succeeded", jobs[fresh.json()["id"]]
    finally:
        svc.stop()


# ----------------------------------------------------------------------------- damaged databases
def _serve_once(data: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "AUDIT_DATA_DIR": str(data), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "audit_service.cli", "serve", "--host", "127.0.0.1", "--port",
                           str(free_port()), "--workers", "0", "--web-workers", "1"],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))


_MAKE_JOBS = """
import os, sys
from audit_service.jobs import JobKind, JobStore
store = JobStore(sys.argv[1])
store.init_schema()
for i in range(int(sys.argv[2])):
    store.create(kind=JobKind.AUDIT, spec={"group": "C4", "i": i}, inputs={"pad": "x" * 600}, timeout_s=60,
                 max_attempts=2)
if sys.argv[3] == "checkpoint":
    import sqlite3
    store.engine.dispose()
    sqlite3.connect(sys.argv[1][len("sqlite:///"):]).execute("PRAGMA wal_checkpoint(TRUNCATE)").close()
    sys.exit(0)
os._exit(0)  # a crash: no checkpoint, the committed jobs live only in the -wal
"""


def _make_jobs(db: Path, n: int, how: str) -> None:
    db.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", _MAKE_JOBS, f"sqlite:///{db}", str(n), how], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT), timeout=120)


def _damage(kind: str, data: Path) -> None:
    db = data / "jobs.sqlite3"
    if kind == "not a SQLite file":
        data.mkdir(parents=True)
        db.write_bytes(b"PK\x03\x04 this is somebody's zip, not a database" * 100)
    elif kind == "corrupt page":
        _make_jobs(db, 40, "checkpoint")
        with open(db, "r+b") as fh:
            fh.seek(4096 * 2)
            fh.write(b"\xde\xad\xbe\xef" * 2048)
    elif kind in ("truncated wal", "deleted wal"):
        _make_jobs(db, 5, "crash")
        wal = db.with_name(db.name + "-wal")
        assert wal.stat().st_size > 0
        if kind == "deleted wal":
            wal.unlink()
        else:
            with open(wal, "r+b") as fh:
                fh.truncate(wal.stat().st_size // 3)


@pytest.mark.parametrize("kind", ["not a SQLite file", "corrupt page", "truncated wal", "deleted wal"])
def test_serve_refuses_a_damaged_database_with_a_message(tmp_path, kind):
    data = tmp_path / "data"
    _damage(kind, data)
    r = _serve_once(data)
    err = r.stderr
    assert r.returncode == 3, (r.returncode, err[-3000:])
    assert "refusing to start" in err and "Traceback" not in err, err[-3000:]
    assert "restore" in err and "aside" in err, err
    if "wal" in kind:
        assert "lost committed jobs" in err, err


def test_serve_starts_on_a_sound_database_after_a_crash(tmp_path):
    """A crash with the -wal intact loses nothing: the check passes and the jobs are all there."""
    data = tmp_path / "data"
    _make_jobs(data / "jobs.sqlite3", 5, "crash")
    svc = Service(data, workers=0, web_workers=1).start()
    try:
        assert requests.get(svc.url + "/audits", timeout=10).json()["total"] == 5
    finally:
        svc.stop()


# ----------------------------------------------------------------------------- model-check limits
def test_model_checks_take_tenant_and_global_slots(tmp_path):
    from audit_service.jobs.settings import Settings
    from audit_service.service.errors import ServiceUnavailable, TooManyRequests
    from audit_service.service.uploads import check_slot

    settings = Settings.from_env({}, data_dir=str(tmp_path), max_model_checks=2, max_tenant_checks=1,
                                 max_tenant_jobs=3)
    with check_slot(settings, "a"):
        with pytest.raises(TooManyRequests) as over:  # a's one check slot is taken
            with check_slot(settings, "a"):
                pass
        assert over.value.slug == "tenant-limit" and int(over.value.headers["Retry-After"]) >= 1
        with check_slot(settings, "b"):
            with pytest.raises(ServiceUnavailable):  # both global slots are taken
                with check_slot(settings, "c"):
                    pass
    with pytest.raises(TooManyRequests):  # a check counts as a job: 3 active jobs leave no room
        with check_slot(settings, "a", active=3):
            pass
    with check_slot(settings, "c"):  # every slot came back
        pass


def test_a_finished_job_on_a_damaged_page_fails_with_the_cause_not_worker_lost(tmp_path):
    """The reports table's page is corrupt: storing the report fails, and the job says why (not worker_lost)."""
    import sqlite3

    from sqlalchemy.exc import DatabaseError

    from audit_service.jobs import JobKind, JobStore

    db = tmp_path / "jobs.sqlite3"
    store = JobStore(f"sqlite:///{db}")
    store.init_schema()
    job = store.create(kind=JobKind.AUDIT, spec={"group": "C4"}, inputs={}, timeout_s=60, max_attempts=2)
    assert store.claim("host:1:x", lease_s=30).id == job.id
    store.engine.dispose()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'reports'").fetchone()[0]
    conn.close()
    with open(db, "r+b") as fh:
        fh.seek((root - 1) * page_size)
        fh.write(b"\xde\xad\xbe\xef" * (page_size // 4))
    with pytest.raises(DatabaseError):
        store.succeed(job.id, "host:1:x", stored_report())
    failed = store.get(job.id)
    assert failed.status == "failed" and failed.error.type == "database_damaged", failed
    assert "restore" in failed.error.message
