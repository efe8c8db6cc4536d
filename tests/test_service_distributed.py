"""The scale-out path for real: a redis-server, the web service with ``AUDIT_BROKER_URL`` and no local
workers, two Celery worker processes (``audit-service worker``) sharing the job database (a SQLite file
here; PostgreSQL across machines). Jobs run on both; kill -9 one worker mid-audit and the job still
ends `succeeded` (taken back from the dead worker and sent again) — never stuck `running`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from conftest import ROOT, Service, free_port, settle, tiny_spec
from polling import wait_for

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        wait_for(client.ping, 20, 0.1, "redis-server to answer PING", ignore=(redis.ConnectionError,))
    except AssertionError:
        proc.kill()
        raise
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


class CeleryWorker:
    def __init__(self, env: dict, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "audit_service.cli", "worker", "--processes", "1"],
                                     env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=str(ROOT),
                                     start_new_session=True)

    def ready(self) -> bool:
        return "ready." in self.log.read_text(errors="replace")

    def pids(self) -> set[int]:
        """The worker's processes (its own session): command, celery main, pool process, fork server."""
        out = subprocess.run(["ps", "-eo", "pid,sid"], capture_output=True, text=True).stdout.split("\n")[1:]
        return {int(p) for p, s in (line.split() for line in out if line.strip()) if int(s) == self.proc.pid}

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def cluster(request, tmp_path_factory, redis_url):
    """The job database: a SQLite file on the shared data dir, or a real PostgreSQL (``tests/pg.py``)."""
    data = tmp_path_factory.mktemp("cluster") / "data"
    common = {"AUDIT_BROKER_URL": redis_url, "AUDIT_LEASE_S": "3", "AUDIT_BROKER_VISIBILITY_S": "60",
              "AUDIT_JOB_MEMORY_MB": "6144", "AUDIT_JOB_TIMEOUT_S": "300"}
    postgres = request.getfixturevalue("postgres") if request.param == "postgresql" else None
    if postgres is not None:
        common["AUDIT_DATABASE_URL"] = postgres.create_database()
    web = Service(data, workers=0, web_workers=1, **common).start()
    env = {**os.environ, "AUDIT_DATA_DIR": str(data), "PYTHONPATH": str(ROOT), **common}
    workers = [CeleryWorker(env, data.parent / f"celery-{i}.log") for i in range(2)]
    def ready() -> bool:
        assert all(w.proc.poll() is None for w in workers), [w.log.read_text()[-2000:] for w in workers]
        return all(w.ready() for w in workers)

    wait_for(ready, 120, 0.3, lambda: f"the celery workers to be ready: {[w.log.read_text()[-2000:] for w in workers]}")
    yield web, workers, data
    for w in workers:
        w.stop()
    web.stop()
    if postgres is not None:
        postgres.drop_database(common["AUDIT_DATABASE_URL"])


def submit(url: str, models: dict, seed: int, heavy: bool = False) -> str:
    options = {**tiny_spec()["options"], "seed": seed}
    if heavy:
        options.update(n_probes=32, ig_steps=16)
    r = requests.post(url + "/audit", files={"model": ("m.onnx", open(models["plain"], "rb"))},
                      data={"spec": json.dumps(tiny_spec(options=options)), "reuse": "false"}, timeout=120)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_audits_run_on_both_celery_workers(cluster, models):
    web, workers, _ = cluster
    ids = [submit(web.url, models, seed) for seed in range(4)]
    jobs = settle(web.url, ids)
    assert {j["status"] for j in jobs.values()} == {"succeeded"}, [j.get("error") for j in jobs.values()]
    ran = [w.log.read_text(errors="replace").count("succeeded in") for w in workers]
    assert all(n >= 1 for n in ran), ran  # prefetch 1: the second worker took work while the first was busy


def test_killing_a_celery_worker_mid_audit_does_not_lose_the_job(cluster, models):
    from audit_service.jobs.store import JobStore

    web, workers, data = cluster
    store = JobStore(web.env.get("AUDIT_DATABASE_URL") or f"sqlite:///{data.resolve() / 'jobs.sqlite3'}")
    job_id = submit(web.url, models, 100, heavy=True)
    row = wait_for(lambda: (r := store.get(job_id)).status == "running" and r.sandbox_pid and r, 120, 0.05,
                   f"job {job_id} to run in a sandbox")
    holder_pid = int(row.owner.split(":")[1])
    victim = next(w for w in workers if holder_pid in w.pids())
    victim.kill()  # kill -9 the whole worker: celery main, pool process, fork server, sandbox
    survivor = next(w for w in workers if w is not victim)
    job = settle(web.url, [job_id], timeout=240)[job_id]
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    assert f":{holder_pid}:" not in (store.get(job_id).owner or "")
    assert survivor.proc.poll() is None
    # and the cluster keeps working with one worker
    assert settle(web.url, [submit(web.url, models, 101)])
