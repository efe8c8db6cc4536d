"""The audit sandbox's kernel cage (``jobs.confine``): what a hostile model can touch.

Two levels. At the launcher, a probe engine tries, from inside the cage, to read the database, the
tokens file, ``/etc/shadow``, home and the parent's environment, to write into the venv (a ``.pth``
drop), the blob store and ``/tmp``, to map files with ``torch.from_file``, to connect to a unix
socket and to signal its parent: all refused, for the warm fork server and a fresh process alike,
while its own work dir stays writable. The same probe with Landlock switched off reads the secrets,
so the assertions can fail. Against a running service with tokens, TorchScript models that call
``aten::from_file`` on the tokens file, the SQLite WAL and the venv get a 422 or a failed job that
holds none of the bytes, and nothing is created outside the sandbox; where the operator switches
Landlock off, TorchScript uploads are refused (fail closed) and ONNX still works.
"""

from __future__ import annotations

import json
import os
import socket
import sysconfig
from pathlib import Path
from typing import List

import pytest
import requests
import torch

from audit_service.jobs.confine import landlock_abi
from audit_service.jobs.launcher import Limits, launch, task_env
from audit_service.jobs.settings import Settings
from builders import Hostile
from conftest import ROOT, Service, settle, tiny_spec

HERE = Path(__file__).resolve().parent
needs_landlock = pytest.mark.skipif(landlock_abi() == 0, reason="this kernel offers no Landlock: the service "
                                    "refuses TorchScript there instead (test_fail_closed_without_landlock)")
SITE_PACKAGES = sysconfig.get_paths()["purelib"]


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """A data dir laid out like the service's, a tokens file beside it, a unix socket."""
    root = tmp_path_factory.mktemp("cage")
    data = root / "data"
    (data / "blobs").mkdir(parents=True)
    (data / "jobs.sqlite3").write_bytes(b"SQLite format 3\x00 SECRET-JOBS")
    tokens = root / "tokens"
    tokens.write_text("admin-token-0123456789abcdef:admin\n")
    blob = data / "blobs" / "abc"
    blob.write_bytes(b"PK\x03\x04 a model")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "control.sock"))
    sock.listen(1)
    yield {"root": root, "data": data, "tokens": tokens, "blob": blob, "sock": root / "control.sock"}
    sock.close()


def run_probe(layout: dict, name: str, warm: bool, writes: bool = True, **settings: object) -> dict:
    data = layout["data"]
    work = data / "work" / name
    (work / "tmp").mkdir(parents=True)
    os.symlink(layout["blob"], work / "model.pt")
    (work / "task.json").write_text(json.dumps({
        "kind": "audit", "engine": "sandbox_probe:file_probe", "spec": {"group": "C4"},
        "model": str(work / "model.pt"), "probes": None, "labels": None, "second_probes": None}))
    st = Settings.from_env({}, data_dir=data, tokens_file=str(layout["tokens"]), **settings)
    secrets = [str(data / "jobs.sqlite3"), str(layout["tokens"])]
    env = {**task_env(work, st), "PYTHONPATH": f"{HERE}:{ROOT}", "PROBE_FILES": json.dumps({
        "read": [*secrets, "/etc/shadow", "/etc/passwd", str(Path.home() / ".bashrc"),
                 f"/proc/{os.getpid()}/environ", str(ROOT / "README.md"), str(work / "model.pt")],
        "write": [f"{SITE_PACKAGES}/audit-cage-test.pth", str(data / "blobs" / "dropped"), "/tmp/audit-cage-test",
                  str(work / "tmp" / "scratch")] if writes else [],
        "from_file": secrets,
        "from_file_shared": [str(layout["root"] / "created-by-model")] if writes else [],
        "unix": [str(layout["sock"])]})}
    handle = launch(work, Limits(memory_mb=0, cpu_s=120, env=env, file_mb=16), warm=warm)
    assert handle.wait(180) == 0, (work / "stderr.log").read_text()[-3000:]
    result = json.loads((work / "result.json").read_text())
    assert result["ok"], result
    return result["report"]


@needs_landlock
@pytest.mark.parametrize("warm", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["fork-server", "fresh-process"])
def test_the_cage_refuses_everything_outside_the_work_dir(layout, warm):
    report = run_probe(layout, f"probe-{warm}", warm)
    for path, what in report["read"].items():
        if path.endswith("model.pt"):
            assert what.startswith("read"), (path, what)  # its own input
        else:
            assert what.startswith("refused"), (path, what)
    for path, what in report["write"].items():
        expected = "written" if path.endswith("/tmp/scratch") else "refused"
        assert what.startswith(expected), (path, what)
    for group in ("from_file", "from_file_shared", "unix"):
        assert all(v.startswith("refused") for v in report[group].values()), report[group]
    assert report["signal_parent"].startswith("refused"), report["signal_parent"]
    confinement = report["confinement"]
    assert confinement["filesystem"] and confinement["landlock_abi"] == landlock_abi()
    assert confinement["seccomp"], confinement["notes"]
    assert not Path(f"{SITE_PACKAGES}/audit-cage-test.pth").exists()
    assert not (layout["data"] / "blobs" / "dropped").exists() and not Path("/tmp/audit-cage-test").exists()
    assert not (layout["root"] / "created-by-model").exists()


def test_without_landlock_the_same_probe_reads_the_secrets(layout):
    """The control: the assertions above fail when the file rules are off, so they test the cage."""
    report = run_probe(layout, "probe-off", True, writes=False, sandbox_landlock="off", allow_unconfined_models=1)
    assert report["read"][str(layout["tokens"])].startswith("read"), report["read"]
    assert report["from_file"][str(layout["data"] / "jobs.sqlite3")].startswith("read"), report["from_file"]
    assert report["confinement"]["filesystem"] is False


# ----------------------------------------------------------------------------- against a running service
ADMIN, BOB = "admin-token-0123456789abcdef", "bob-token-0123456789abcdef"


class FromFile(Hostile):
    """``aten::from_file`` on a path of the attacker's choice, at the model check (``every_batch``) or
    only on audit batches; a read puts the bytes into the exception message."""

    def __init__(self, path: str, size: int, shared: bool, every_batch: bool) -> None:
        super().__init__(calm=0 if every_batch else 16)  # the submission check runs 16 samples; the audit 32
        self.path, self.size, self.shared = path, size, shared

    def attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = torch.from_file(self.path, shared=self.shared, size=self.size, dtype=torch.uint8)
        if not self.shared:
            stolen: List[int] = t.long().tolist()
            raise RuntimeError("STOLEN" + str(stolen))
        return y + t.float().sum() * 0.0


def _leak_marker(text: str) -> str:
    return str(list(text.encode()[:16]))[1:-1]  # the first bytes as the model would print them


@pytest.fixture(scope="module")
def caged_service(tmp_path_factory):
    root = tmp_path_factory.mktemp("caged")
    tokens = root / "tokens"
    tokens.write_text(f"{BOB}:bob\n")
    svc = Service(root / "data", workers=1, web_workers=1, AUDIT_TOKENS=f"{ADMIN}:admin",
                  AUDIT_TOKENS_FILE=str(tokens)).start()
    yield svc, tokens
    svc.stop()


def _submit(svc: Service, model: Path, token: str) -> requests.Response:
    spec = tiny_spec("flip", options={**tiny_spec()["options"], "n_probes": 16, "n_noise_probes": 16})
    return requests.post(svc.url + "/audit", headers={"Authorization": f"Bearer {token}"},
                         files={"model": (model.name, model.read_bytes())},
                         data={"spec": json.dumps(spec)}, timeout=180)


@pytest.mark.slow
@needs_landlock
def test_from_file_models_reach_nothing_outside_the_sandbox(caged_service, tmp_path):
    from builders import IMAGE_SHAPE, export_torchscript

    svc, tokens = caged_service
    wal = svc.data_dir / "jobs.sqlite3-wal"
    drop = Path(SITE_PACKAGES) / "audit-cage-attack.pth"
    outside = svc.data_dir / "planted-by-model"
    secret_texts = {str(tokens): tokens.read_text(), str(svc.data_dir / "jobs.sqlite3"): "SQLite format 3"}
    cases = {
        "tokens": FromFile(str(tokens), len(tokens.read_bytes()), False, True),
        "database": FromFile(str(svc.data_dir / "jobs.sqlite3"), 64, False, True),
        "wal": FromFile(str(wal), 32, False, True),
        "pth_drop": FromFile(str(drop), 64, True, True),
        "plant_in_data_dir": FromFile(str(outside), 64, True, True),
    }
    for name, module in cases.items():
        model = export_torchscript(module.eval(), IMAGE_SHAPE, tmp_path / f"{name}.pt", script=True)
        r = _submit(svc, model, BOB)
        assert r.status_code == 422, (name, r.status_code, r.text[:500])
        body = r.text
        assert "Permission denied" in body, (name, body[:500])
        assert "STOLEN" not in body
        for text in secret_texts.values():
            assert _leak_marker(text) not in body, name
        assert len(body) < 4000
    assert not drop.exists() and not outside.exists()

    # the same attack only on audit batches: the check passes, the job fails, nothing leaks
    late = export_torchscript(FromFile(str(tokens), len(tokens.read_bytes()), False, False).eval(), IMAGE_SHAPE,
                              tmp_path / "late.pt", script=True)
    r = _submit(svc, late, BOB)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    job = settle(svc.url, [job_id], headers={"Authorization": f"Bearer {BOB}"})[job_id]
    assert job["status"] == "failed", job
    assert "Permission denied" in job["error"]["message"] and "STOLEN" not in job["error"]["message"]
    assert _leak_marker(tokens.read_text()) not in json.dumps(job)
    log = svc.log.read_text(errors="replace")
    assert ADMIN not in log and BOB not in log


@pytest.mark.slow
def test_fail_closed_without_landlock(tmp_path, models):
    """Landlock off (or a kernel without it): TorchScript is refused with a 422 that says what to do,
    ONNX is still audited; the operator's opt-in setting lets TorchScript through again."""
    from builders import IMAGE_SHAPE, export_torchscript

    scripted = export_torchscript(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 10)), IMAGE_SHAPE,
                                  tmp_path / "linear.pt")
    svc = Service(tmp_path / "data", workers=0, web_workers=1, AUDIT_SANDBOX_LANDLOCK="off").start()
    try:
        r = requests.post(svc.url + "/audit", files={"model": ("linear.pt", scripted.read_bytes())},
                          data={"spec": json.dumps(tiny_spec())}, timeout=180)
        assert r.status_code == 422, r.text
        problem = r.json()
        assert problem["field"] == "model" and "ONNX" in problem["detail"]
        assert "AUDIT_ALLOW_UNCONFINED_MODELS" in problem["detail"]
        ok = requests.post(svc.url + "/audit", files={"model": ("plain.onnx", models["plain"].read_bytes())},
                           data={"spec": json.dumps(tiny_spec())}, timeout=180)
        assert ok.status_code == 202, ok.text
    finally:
        svc.stop()
    secret = tmp_path / "secret.txt"
    secret.write_text("operator-secret-0123456789\n")
    thief = export_torchscript(FromFile(str(secret), len(secret.read_bytes()), False, True).eval(), IMAGE_SHAPE,
                               tmp_path / "thief.pt", script=True)
    opted_in = Service(tmp_path / "data2", workers=0, web_workers=1, AUDIT_SANDBOX_LANDLOCK="off",
                       AUDIT_ALLOW_UNCONFINED_MODELS="1").start()
    try:
        r = requests.post(opted_in.url + "/audit", files={"model": ("linear.pt", scripted.read_bytes())},
                          data={"spec": json.dumps(tiny_spec())}, timeout=180)
        assert r.status_code == 202, r.text
        # the control for test_from_file_models_reach_nothing_outside_the_sandbox: without the cage the
        # same attack reads the file and the model check's 422 carries its bytes (capped, but out)
        stolen = requests.post(opted_in.url + "/audit", files={"model": ("thief.pt", thief.read_bytes())},
                               data={"spec": json.dumps(tiny_spec("flip"))}, timeout=180)
        assert stolen.status_code == 422 and "STOLEN" in stolen.text and _leak_marker(secret.read_text()) in stolen.text
    finally:
        opted_in.stop()


class Printer(Hostile):
    """Prints about 1 MB a batch on audit batches: a model that fills the disk through its log."""

    def attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for _ in range(5000):
            print("spam spam spam spam spam spam spam spam spam spam spam spam spam spam spam spam spam "
                  "spam spam spam spam spam spam spam spam spam spam spam spam spam spam spam spam spam")
        return y


class Filler(Hostile):
    """Creates 1 MiB files in its work dir (``from_file(shared=True)`` on relative names) on audit batches."""

    def attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for i in range(64):
            t = torch.from_file("fill-" + str(i) + ".bin", shared=True, size=1 << 20, dtype=torch.uint8)
            t.fill_(1)
            y = y + t[:1].float() * 0.0
        return y


@pytest.mark.slow
def test_printing_and_file_filling_models_stay_within_the_scratch_cap(tmp_path):
    """A model's stderr.log is capped by RLIMIT_FSIZE at half the scratch cap (writes past it fail; the model
    goes on); a model
    that fills its work dir with files is killed by the worker's scratch check and fails with the
    reason. Neither work dir grows past the cap and the service answers throughout."""
    import threading

    from builders import IMAGE_SHAPE, export_torchscript

    printer = export_torchscript(Printer(), IMAGE_SHAPE, tmp_path / "printer.pt", script=True)
    filler = export_torchscript(Filler(), IMAGE_SHAPE, tmp_path / "filler.pt", script=True)
    svc = Service(tmp_path / "data", workers=1, web_workers=1, AUDIT_JOB_SCRATCH_MB="2").start()
    biggest = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for log in (svc.data_dir / "work").glob("*/stderr.log"):
                try:
                    biggest[0] = max(biggest[0], log.stat().st_size)
                except OSError:
                    pass
            done.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        ids = []
        for model in (printer, filler):
            r = requests.post(svc.url + "/audit", files={"model": (model.name, model.read_bytes())},
                              data={"spec": json.dumps(tiny_spec("flip"))}, timeout=180)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        jobs = settle(svc.url, ids, timeout=240)
        done.set()
        printed, filled = jobs[ids[0]], jobs[ids[1]]
        assert 512 * 1024 < biggest[0] <= 1024 * 1024, biggest[0]  # it printed ~5 MB; one file holds half the cap
        assert printed["status"] == "succeeded", printed["error"]
        assert filled["status"] == "failed" and filled["error"]["type"] == "scratch_limit", filled
        assert "AUDIT_JOB_SCRATCH_MB" in filled["error"]["message"]
        assert requests.get(svc.url + "/healthz", timeout=5).status_code == 200
    finally:
        done.set()
        svc.stop()


def test_the_wall_clock_limit_holds_when_the_heartbeat_cannot_be_written(tmp_path, models):
    """The database refuses writes (a full disk) while a model spins: the worker keeps supervising and
    kills the audit at its timeout instead of leaving it running unsupervised."""
    import time

    from audit_service.jobs import BlobStore, JobKind, JobStore
    from audit_service.jobs.states import JobStatus
    from audit_service.jobs.worker import run_job

    class FullDiskStore(JobStore):
        def heartbeat(self, *args, **kwargs):  # noqa: ANN002, ANN003
            raise OSError(28, "No space left on device")

    settings = Settings.from_env({}, data_dir=tmp_path / "data", lease_s=60.0)
    store = FullDiskStore(settings.resolved_database_url)
    store.init_schema()
    blobs = BlobStore(Path(settings.data_dir) / "blobs")
    with open(models["hang"], "rb") as fh:
        sha, size = blobs.put_stream(fh, max_bytes=10 ** 8)
    job = store.create(kind=JobKind.AUDIT, spec=tiny_spec("flip"), timeout_s=3, max_attempts=1,
                       inputs={"model": {"sha256": sha, "size_bytes": size, "format": "torchscript"}})
    claimed = store.claim("test-owner", lease_s=60)
    assert claimed is not None and claimed.id == job.id
    started = time.monotonic()
    outcome = run_job(claimed, store, blobs, settings, "test-owner")
    assert outcome.status == JobStatus.FAILED and "wall-clock limit of 3 s" in outcome.detail, outcome
    assert time.monotonic() - started < 60


def test_the_sandbox_environment_is_an_allow_list(tmp_path, monkeypatch):
    """Credentials in the service's environment (registry tokens, cloud keys, database URLs, the
    service's own tokens) never reach the sandbox; the runtime's knobs do."""
    secrets = {"MLFLOW_TRACKING_TOKEN": "t", "AWS_SECRET_ACCESS_KEY": "k", "DATABASE_URL": "postgresql://x",
               "AUDIT_TOKENS": "tok:admin", "AUDIT_DATABASE_URL": "sqlite:///x", "GITHUB_TOKEN": "g"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    work = tmp_path / "env"
    (work / "tmp").mkdir(parents=True)
    (work / "task.json").write_text(json.dumps({"kind": "audit", "engine": "sandbox_probe:env_probe",
                                                "spec": {"group": "C4"}, "model": None}))
    st = Settings.from_env({}, data_dir=tmp_path)
    handle = launch(work, Limits(cpu_s=60, env={**task_env(work, st), "PYTHONPATH": f"{HERE}:{ROOT}"}), warm=False)
    assert handle.wait(120) == 0, (work / "stderr.log").read_text()[-2000:]
    names = json.loads((work / "result.json").read_text())["report"]["names"]
    assert not set(secrets) & set(names), set(secrets) & set(names)
    assert "OMP_NUM_THREADS" in names and "PATH" in names
