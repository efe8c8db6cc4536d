"""Issue 17: a verdict the audited model cannot write.

A TorchScript model is a program: with ``torch.from_file(..., shared=True)`` it writes files wherever its
process may. Before the cage it wrote ``result.json`` and ``exit.json`` in the sandbox's work dir and the job
ended ``genuine``. Now the model runs in its own process (``jobs.cage``), confined to ``WORKDIR/cage``; the
engine that writes the report and the fork server that reports the exit status are out of its reach.

Two levels, each with the attack's own evidence as the control (the forged files are written, where the
model may write, and nobody reads them): the sandbox as the worker starts it (warm fork server and fresh
process), and a running service (the job's verdict, the processes left after it, the submission check).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List

import numpy as np
import pytest
import requests
import torch

from audit_service.jobs.confine import landlock_abi
from audit_service.jobs.launcher import Limits, group_alive, launch, task_env
from audit_service.jobs.settings import Settings
from builders import IMAGE_SHAPE, Hostile, export_torchscript
from conftest import Service, settle, tiny_spec
from polling import wait_for

HERE = Path(__file__).resolve().parent
needs_landlock = pytest.mark.skipif(landlock_abi() == 0, reason="no Landlock: TorchScript is refused (fail closed)")

FORGED = json.dumps({"ok": True, "report": {"verdict": {"label": "genuine", "passed": True, "reasons": []}}})
EXIT = json.dumps({"rc": 0})


class Forger(Hostile):
    """A linear layer (not flip-invariant) that, on every batch of more than ``calm`` samples, writes a
    forged ``genuine`` result and a zero exit status at ``prefix + "result.json"`` / ``prefix + "exit.json"``,
    then goes on computing honest logits."""

    def __init__(self, prefix: str, calm: int = 16) -> None:
        super().__init__(calm)
        self.result_path, self.exit_path = prefix + "result.json", prefix + "exit.json"
        self.register_buffer("result", torch.tensor(list(FORGED.encode()), dtype=torch.uint8))
        self.register_buffer("exit_code", torch.tensor(list(EXIT.encode()), dtype=torch.uint8))

    def attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # the writes feed the output (times 0), so no pass drops them
        r = torch.from_file(self.result_path, shared=True, size=self.result.numel(), dtype=torch.uint8)
        r.copy_(self.result)
        e = torch.from_file(self.exit_path, shared=True, size=self.exit_code.numel(), dtype=torch.uint8)
        e.copy_(self.exit_code)
        return y + (r.float().sum() + e.float().sum()) * 0.0


class TaskReader(Hostile):
    """Reads the task spec of its own job (``../task.json``) and puts its bytes in the error."""

    def __init__(self) -> None:
        super().__init__(calm=16)

    def attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = torch.from_file("../task.json", shared=False, size=8, dtype=torch.uint8)
        read: List[int] = t.long().tolist()
        raise RuntimeError("READ" + str(read))


def _spec() -> dict:
    return tiny_spec("flip", options={**tiny_spec()["options"], "n_probes": 16, "n_noise_probes": 16,
                                      "saliency": False, "jacobian_probes": 0})


def _run_sandbox(tmp_path: Path, name: str, module: torch.nn.Module, warm: bool) -> tuple[int, dict, Path]:
    """The sandbox as the worker runs it (task.json, limits, the launcher), ended with its whole group."""
    model = export_torchscript(module.eval(), IMAGE_SHAPE, tmp_path / f"{name}.pt", script=True)
    work = tmp_path / f"work-{name}-{warm}"
    (work / "tmp").mkdir(parents=True)
    probes = tmp_path / "probes.npy"
    np.save(probes, np.random.default_rng(0).normal(size=(16, *IMAGE_SHAPE)).astype(np.float32))
    (work / "task.json").write_text(json.dumps({"kind": "audit", "spec": _spec(), "model": str(model),
                                                "probes": str(probes)}))
    settings = Settings.from_env({}, data_dir=tmp_path)
    handle = launch(work, Limits(cpu_s=120, env=task_env(work, settings)), warm=warm)
    try:
        handle.wait(240)
    finally:
        rc = handle.end()
    assert not group_alive(handle.pid), "a process of the sandbox outlived its task"
    return rc, json.loads((work / "result.json").read_text()), work


@needs_landlock
@pytest.mark.parametrize("warm", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["fork-server", "fresh"])
def test_a_model_writing_its_own_result_gets_the_honest_verdict(tmp_path, warm):
    rc, result, work = _run_sandbox(tmp_path, "forger", Forger(""), warm)
    # the control: the attack ran and wrote its forged files, in the only place it may write
    assert json.loads((work / "cage" / "result.json").read_text())["report"]["verdict"]["label"] == "genuine"
    assert (work / "cage" / "exit.json").read_text() == EXIT
    # and nobody read them: the engine's result is the honest one, and there is no exit.json to believe
    assert rc == 0 and result["ok"], result
    assert result["report"]["verdict"]["label"] == "not_invariant", result["report"]["verdict"]
    assert not (work / "exit.json").exists()


@needs_landlock
def test_a_model_cannot_write_into_the_engines_work_dir_or_read_the_task(tmp_path):
    rc, result, work = _run_sandbox(tmp_path, "climber", Forger("../"), True)
    assert rc == 0 and not result["ok"], result
    assert "Permission denied" in result["error"]["message"], result
    assert result["error"]["field"] == "model"
    assert json.loads((work / "result.json").read_text()) == result  # the engine's, not the model's
    assert not (work / "exit.json").exists()

    rc, result, _ = _run_sandbox(tmp_path, "reader", TaskReader(), True)
    assert not result["ok"] and "Permission denied" in result["error"]["message"], result
    assert "READ" not in result["error"]["message"]


@needs_landlock
def test_the_cage_holds_only_its_own_descriptors(tmp_path):
    """The cage of a real model has stdin/stdout/stderr and its socket; whatever else the engine or the fork
    server had open (onnxruntime's SQLite files, the server's pipes) reads as /dev/null."""
    model = export_torchscript(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 10)), IMAGE_SHAPE,
                               tmp_path / "m.pt")
    work = tmp_path / "work"
    (work / "tmp").mkdir(parents=True)
    (work / "task.json").write_text(json.dumps({"kind": "audit", "engine": "sandbox_probe:cage_fd_probe",
                                                "spec": {"group": "flip"}, "model": str(model)}))
    settings = Settings.from_env({}, data_dir=tmp_path)
    handle = launch(work, Limits(cpu_s=60, env={**task_env(work, settings), "PYTHONPATH": str(HERE)}), warm=True)
    handle.wait(120)
    assert handle.end() == 0
    report = json.loads((work / "result.json").read_text())["report"]
    cage, engine = report["cage"], report["engine"]
    open_files = {fd: target for fd, target in cage.items() if target not in ("/dev/null",)}
    assert set(open_files) <= {"0", "1", "2"} | {fd for fd, t in cage.items() if t.startswith("socket:")}, cage
    assert sum(t.startswith("socket:") for t in cage.values()) == 1, cage
    assert not any("onnxruntime" in t or t.startswith("pipe:") for t in list(cage.values()) + list(engine.values())), \
        (cage, engine)


# ----------------------------------------------------------------------------- against a running service
@pytest.fixture(scope="module")
def service_two_tenants(tmp_path_factory):
    root = tmp_path_factory.mktemp("forged")
    svc = Service(root / "data", workers=1, web_workers=1,
                  AUDIT_TOKENS="alice-token-0123456789abcdef:alice,bob-token-0123456789abcdef:bob").start()
    yield svc
    svc.stop()


def _submit(svc: Service, data: bytes, name: str, token: str, spec: dict | None = None) -> requests.Response:
    return requests.post(svc.url + "/audit", headers={"Authorization": f"Bearer {token}"},
                         files={"model": (name, data)},
                         data={"spec": json.dumps(spec or _spec()), "reuse": "false"}, timeout=180)


def _sandbox_processes(data_dir: Path) -> list[int]:
    """Processes whose working directory is inside the service's work or check dirs."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if cwd.startswith(str(data_dir.resolve()) + "/"):
                found.append(int(entry))
    return found


@pytest.mark.slow
@needs_landlock
def test_a_forging_model_against_a_running_service(service_two_tenants, tmp_path):
    svc = service_two_tenants
    alice = "alice-token-0123456789abcdef"
    # forges on every batch: the submission check's too (which then ran on, past its answer, before the cage)
    forger = export_torchscript(Forger("", calm=-1).eval(), IMAGE_SHAPE, tmp_path / "forger.pt", script=True)
    climber = export_torchscript(Forger("../").eval(), IMAGE_SHAPE, tmp_path / "climber.pt", script=True)
    ids = {}
    for name, path in (("forger", forger), ("climber", climber)):
        r = _submit(svc, path.read_bytes(), path.name, alice)
        assert r.status_code == 202, r.text
        ids[name] = r.json()["id"]
        # the submission check's sandbox is gone once the answer is out
        assert _sandbox_processes(svc.data_dir / "validate") == []
    jobs = settle(svc.url, list(ids.values()), headers={"Authorization": f"Bearer {alice}"})
    forged, climbed = jobs[ids["forger"]], jobs[ids["climber"]]
    assert forged["status"] == "succeeded", forged
    report = requests.get(svc.url + f"/audits/{ids['forger']}/report",
                          headers={"Authorization": f"Bearer {alice}"}, timeout=30).json()
    # no probes given: the honest answer is "not genuine" (learned vs not_invariant cannot be told apart)
    assert report["verdict"]["label"] == "not_genuine" and report["verdict"]["passed"] is False, report["verdict"]
    assert climbed["status"] == "failed" and "Permission denied" in climbed["error"]["message"], climbed
    assert _settled_soon(svc.data_dir), "sandbox processes outlived their jobs"


def _settled_soon(data_dir: Path, timeout: float = 5.0) -> bool:
    try:
        return wait_for(lambda: not _sandbox_processes(data_dir), timeout, 0.1, "the sandbox processes to exit")
    except AssertionError:
        return False


@pytest.mark.slow
def test_two_tenants_uploading_the_same_bytes_during_each_others_audits_lose_no_job(service_two_tenants, models):
    """End to end: interleaved tenants uploading the same bytes all succeed. The race it guards (a blob replaced
    between a sandbox's Landlock rule and its open) is milliseconds wide, so this passes without the fix too;
    ``tests/test_jobs.py::test_a_stored_blob_is_never_replaced`` is the test that fails without it."""
    svc = service_two_tenants
    data = models["plain"].read_bytes()
    tokens = ["alice-token-0123456789abcdef", "bob-token-0123456789abcdef"]
    ids: dict[str, str] = {}
    for i in range(8):
        token = tokens[i % 2]
        r = _submit(svc, data, "m.onnx", token, tiny_spec("flip"))
        assert r.status_code == 202, r.text
        ids[r.json()["id"]] = token
    for job_id, token in ids.items():
        job = settle(svc.url, [job_id], headers={"Authorization": f"Bearer {token}"})[job_id]
        assert job["status"] == "succeeded", job


def test_the_fork_servers_home_is_gone_once_it_is_warm():
    """The throwaway home the fork server's imports write into (onnxruntime's SQLite file) is removed by the
    server itself once its imports are done: none piles up across restarts, however the owner ends."""
    import tempfile

    from audit_service.jobs.launcher import ForkServer

    before = set(Path(tempfile.gettempdir()).glob("audit-forkserver-*"))
    server = ForkServer()
    try:
        server.warm(wait=True)
        assert server.alive()
        assert set(Path(tempfile.gettempdir()).glob("audit-forkserver-*")) - before == set()
    finally:
        server.stop()
