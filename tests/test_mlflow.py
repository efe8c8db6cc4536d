"""MLflow registry: a real ``mlflow server`` (SQLite backend, proxied local artifact store) on a free loopback
port, real ONNX models registered in it, audited through the CLI and the service, the verdict read back."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

mlflow = pytest.importorskip("mlflow")
onnx = pytest.importorskip("onnx")

from builders import IMAGE_SHAPE, OrbitAveragedCNN, PlainCNN, export_onnx  # noqa: E402
from conftest import Service, free_port, tiny_spec  # noqa: E402
from polling import wait_for  # noqa: E402
from reports import stored_report  # noqa: E402

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "audit_service.cli"]
FAST = ["--option", "n_probes=8", "--option", "n_noise_probes=8", "--option", "ig_steps=4",
        "--option", "jacobian_probes=4", "--option", "bootstrap=20", "--shift", "none", "--quiet"]
QUIET_MLFLOW = {"MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> str:
    """``mlflow server`` with SQLite and a proxied artifact store; its URL once /health answers."""
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(d / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
         "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=d, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # its uvicorn child dies with it
        env={**os.environ, **QUIET_MLFLOW, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    def healthy() -> bool:
        assert proc.poll() is None, (d / "server.log").read_text()[-3000:]
        return requests.get(url + "/health", timeout=1).status_code == 200

    try:
        wait_for(healthy, 180, 0.5, "the mlflow server to answer /health", ignore=(requests.RequestException,))
    except AssertionError:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("mlflow server did not come up:\n" + (d / "server.log").read_text()[-3000:]) from None
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def registered(tracking, tmp_path_factory) -> dict:
    """tiny-onnx v1 (the onnx flavor, alias champion), tiny-external v1 (the same with external data),
    tiny-plain v1 (a plain .onnx artifact of a run), tiny-torch v1 (the pytorch flavor, pickled)."""
    d = tmp_path_factory.mktemp("models")
    os.environ.update(QUIET_MLFLOW)
    mlflow.set_tracking_uri(tracking)
    client = mlflow.MlflowClient(tracking)
    genuine = export_onnx(OrbitAveragedCNN(PlainCNN(), group="C4"), IMAGE_SHAPE, d / "genuine.onnx")
    plain = export_onnx(PlainCNN(), IMAGE_SHAPE, d / "plain.onnx")
    with mlflow.start_run():
        mlflow.onnx.log_model(onnx.load(str(genuine)), name="model", registered_model_name="tiny-onnx",
                              pip_requirements=["onnx"], save_as_external_data=False)
    client.set_registered_model_alias("tiny-onnx", "champion", "1")
    with mlflow.start_run():  # MLflow's default: the weights in a side file (external data)
        mlflow.onnx.log_model(onnx.load(str(genuine)), name="model", registered_model_name="tiny-external",
                              pip_requirements=["onnx"])
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(plain), "export")
        plain_run = run.info.run_id
    client.create_registered_model("tiny-plain")
    client.create_model_version("tiny-plain", f"runs:/{plain_run}/export/plain.onnx", run_id=plain_run)
    with mlflow.start_run():
        mlflow.pytorch.log_model(PlainCNN(), name="model", registered_model_name="tiny-torch",
                                 pip_requirements=["torch"], serialization_format="pickle")
    return {"client": client, "plain_run": plain_run}


def cli(tracking: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **QUIET_MLFLOW, "MLFLOW_TRACKING_URI": tracking})


def assert_bad_input(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), lines[0]


def test_cli_audits_onnx_flavor_by_alias_and_writes_back(tracking, registered, tmp_path):
    out = tmp_path / "report.json"
    r = cli(tracking, "audit", "models:/tiny-onnx@champion", "--group", "C4", *FAST, "--require", "genuine",
            "--mlflow-write-back", "--output", out)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["verdict"]["label"] == "genuine"
    client = registered["client"]
    tags = client.get_model_version("tiny-onnx", "1").tags  # the alias named version 1
    assert tags["invariance.verdict"] == "genuine" and tags["invariance.passed"] == "true"
    assert tags["invariance.policy"].startswith(report["verdict"]["policy"]["name"] + "@")
    assert float(tags["invariance.LI_normalized"]) < 1e-3 and "invariance.DI" in tags
    run = client.get_run(tags["invariance.run_id"])
    assert run.data.tags["model_name"] == "tiny-onnx" and run.data.tags["model_version"] == "1"
    assert client.get_experiment(run.info.experiment_id).name == "invariance-audits"
    assert {f.path for f in client.list_artifacts(run.info.run_id, "invariance")} == {
        "invariance/report.json", "invariance/report.html"}
    back = json.loads(Path(client.download_artifacts(run.info.run_id, "invariance/report.json", str(tmp_path)))
                      .read_text())
    assert back["verdict"] == report["verdict"]


def test_cli_plain_onnx_artifact_gate_and_runs_uri(tracking, registered):
    r = cli(tracking, "audit", "models:/tiny-plain/1", "--group", "C4", *FAST, "--require", "genuine")
    assert r.returncode == 1, r.stderr  # a plain CNN is no genuine C4 invariant: the gate fails
    run_id = registered["plain_run"]
    r = cli(tracking, "audit", f"runs:/{run_id}/export/plain.onnx", "--group", "C4", *FAST, "--mlflow-write-back")
    run = registered["client"].get_run(run_id)
    assert run.data.tags["invariance.verdict"] != "genuine" and run.data.tags["invariance.passed"] in ("true", "false")
    # written back whatever the gate says; the exit status is that gate (issue 23: default genuine,learned)
    assert r.returncode == (0 if run.data.tags["invariance.passed"] == "true" else 1), r.stderr
    assert "invariance/report.json" in {f.path for f in registered["client"].list_artifacts(run_id, "invariance")}


def test_cli_refuses_pickled_flavor_and_bad_uris(tracking, registered):
    assert_bad_input(cli(tracking, "audit", "models:/tiny-torch/1", "--group", "C4", *FAST),
                     "'pytorch' flavor", "pickle", "mlflow.onnx.log_model")
    assert_bad_input(cli(tracking, "audit", "models:/tiny-onnx/7", "--group", "C4", *FAST), "models:/tiny-onnx/7")
    assert_bad_input(cli(tracking, "audit", "models:/tiny-onnx", "--group", "C4"), "models:/NAME/VERSION")


def test_cli_audits_the_default_external_data_logging(tracking, registered, tmp_path):
    """Issue 18: ``mlflow.onnx.log_model`` with its defaults saves the weights in a ``<uuid>.data`` file beside
    ``model.onnx``; the CLI fetches it with the graph and audits with integrated gradients."""
    from audit_service.adapters.mlflow_registry import Registry, RegistryError, parse_model_uri
    from audit_service.engine.runtime import model_files_sha256

    out = tmp_path / "report.json"
    r = cli(tracking, "audit", "models:/tiny-external/1", "--group", "C4", *FAST, "--require", "genuine",
            "--output", out)
    assert r.returncode == 0, r.stderr
    model = json.loads(out.read_text())["model"]
    assert model["gradient_path"].startswith("autograd") and model["twin_max_error"] <= 1e-4, model
    local = Path(mlflow.artifacts.download_artifacts("models:/tiny-external/1", dst_path=str(tmp_path / "dl")))
    graph = onnx.load(str(local / "model.onnx"), load_external_data=False)
    names = {e.value for t in graph.graph.initializer for e in t.external_data if e.key == "location"}
    assert len(names) == 1 and next(iter(names)).endswith(".data"), names  # MLflow's default: one side file
    expected = model_files_sha256(local / "model.onnx", {n: local / n for n in names})[0]
    assert model["sha256"] == expected  # the identity covers the data
    # the cap covers the graph and its data together, checked while streaming
    registry = Registry(tracking, proxied_only=True)
    located = registry.locate(parse_model_uri("models:/tiny-external/1"))
    assert set(located.data) >= names and "MLmodel" not in located.data and "conda.yaml" not in located.data
    with pytest.raises(RegistryError, match=rf"and its external data to total at most {located.size + 100} bytes, "
                                            rf"but it is larger with '{next(iter(names))}'") as err:
        registry.fetch(located, tmp_path, max_bytes=located.size + 100)
    assert err.value.too_large


def test_fetch_streams_through_the_registry_under_the_cap(tracking, registered, tmp_path):
    from audit_service.adapters.mlflow_registry import Registry, RegistryError, parse_model_uri

    registry = Registry(tracking, proxied_only=True)
    located = registry.locate(parse_model_uri("models:/tiny-plain/1"))  # source runs:/...: resolved
    assert located.directory.startswith("mlflow-artifacts:/") and located.file == "plain.onnx"
    assert registry.fetch(located, tmp_path, max_bytes=located.size).stat().st_size == located.size
    for size in (located.size, None):  # refused by the listed size, and while streaming
        located.size = size
        with pytest.raises(RegistryError, match="at most 1000 bytes") as err:
            registry.fetch(located, tmp_path, max_bytes=1000)
        assert err.value.too_large


def test_service_fetches_from_allowed_registry_only(tracking, registered, tmp_path):
    svc = Service(tmp_path / "data", workers=1, web_workers=1, AUDIT_MLFLOW_ALLOWED_URIS=f"main={tracking}",
                  AUDIT_WRITE_BACK_RULES="default:tiny-onnx", AUDIT_MAX_MODEL_MB=4, AUDIT_JOB_TIMEOUT_S=300,
                  AUDIT_MAX_WAIT_S=120).start()
    try:
        spec = json.dumps(tiny_spec())
        def post(**form: str) -> requests.Response:  # multipart form fields, no file part
            parts = {k: (None, v) for k, v in {"spec": spec, **form}.items()}
            return requests.post(f"{svc.url}/audit?wait=120", files=parts, timeout=150)

        r = post(model_uri="models:/tiny-onnx@champion", mlflow_write_back="true")
        assert r.status_code == 200, r.text
        assert r.json()["verdict"] == "genuine"  # the compact ?wait= answer
        job = requests.get(svc.url + r.headers["Location"], timeout=30).json()
        assert job["inputs"]["model"]["filename"] == "models:/tiny-onnx@champion"
        request = job["inputs"]["model"]["mlflow"]  # stored with the job: the worker writes back
        assert request["registry"] == "main" and request["version"] == "1", request
        # written before the job was recorded as succeeded: the tags are there the moment it is
        tags = registered["client"].get_model_version("tiny-onnx", "1").tags
        assert tags["invariance.verdict"] == "genuine", tags
        outcome = requests.get(svc.url + job["links"]["report"], timeout=30).json()["mlflow_write_back"]
        assert outcome["status"] == "written" and outcome["attempts"] == 1, outcome
        assert outcome["tags"]["invariance.verdict"] == "genuine"
        assert job["write_back"] == outcome, "the outcome is on the job itself"
        again = post(model_uri="models:/tiny-onnx@champion", mlflow_write_back="true")
        assert again.status_code == 200 and again.json()["id"] != job["id"], "a write-back is never a reused twin"

        r = post(model_uri="models:/tiny-plain/1", reuse="false")  # a run artifact, through the same checks
        assert r.status_code == 200 and r.json()["verdict"] != "genuine", r.text
        # issue 18: MLflow's default logging, the weights in a side file: fetched with the graph, under the cap
        r = post(model_uri="models:/tiny-external/1")
        assert r.status_code == 200 and r.json()["verdict"] == "genuine", r.text
        job = requests.get(svc.url + r.headers["Location"], timeout=30).json()
        data = [k for k in job["inputs"] if k.startswith("model_data/")]
        assert len(data) == 1 and data[0].endswith(".data"), job["inputs"]  # MLmodel, conda.yaml... not kept
        report = requests.get(svc.url + job["links"]["report"], timeout=30).json()
        assert report["model"]["gradient_path"].startswith("autograd"), report["model"]
        r = post(model_uri="models:/tiny-onnx/1", mlflow_registry="elsewhere")
        assert r.status_code == 403 and "allowed registry" in r.json()["detail"]
        r = post(model_uri="models:/tiny-torch/1")
        assert r.status_code == 422 and "'pytorch' flavor" in r.json()["detail"]
        r = post(model_uri=f"{tracking}/models:/tiny-onnx/1")
        assert r.status_code == 422, r.text
    finally:
        svc.stop()


def test_write_back_never_records_a_forged_verdict(tracking, registered, tmp_path):
    """Issue 17: a ``.pt2`` whose graph maps ``result.json`` with ``aten.from_file`` and copies a verdict into
    it, registered as a run artifact and sent with write-back: refused at submission naming the op, and the
    model version gets no verdict tag at all (the registry takes only ONNX and ``.pt2`` files; the TorchScript
    forger is tests/test_forged_verdict.py's)."""
    from test_pt2 import _FileWriter, _export, _program, _saved, _with_program

    plain = tmp_path / "writer.pt2"
    plain.write_bytes(_saved(_export(_FileWriter())))
    program = _program(plain)
    node = program["graph_module"]["graph"]["nodes"][0]
    node["target"] = "torch.ops.aten.from_file.default"
    node["inputs"] = [{"name": "filename", "arg": {"as_string": "result.json"}, "kind": 1},
                      {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                      {"name": "size", "arg": {"as_int": 16}, "kind": 1}, *node["inputs"][1:]]
    forger = _with_program(plain, tmp_path / "forger.pt2", program)
    client = registered["client"]
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(forger), "export")
    client.create_registered_model("tiny-forger")
    client.create_model_version("tiny-forger", f"runs:/{run.info.run_id}/export/forger.pt2", run_id=run.info.run_id)
    svc = Service(tmp_path / "data", workers=1, web_workers=1, AUDIT_MLFLOW_ALLOWED_URIS=f"main={tracking}",
                  AUDIT_WRITE_BACK_RULES="default:*", AUDIT_MAX_WAIT_S=120).start()
    try:
        parts = {k: (None, v) for k, v in {"spec": json.dumps(tiny_spec("flip")), "model_uri": "models:/tiny-forger/1",
                                            "mlflow_write_back": "true"}.items()}
        r = requests.post(f"{svc.url}/audit?wait=120", files=parts, timeout=150)
        assert r.status_code == 422, r.text
        assert "'aten.from_file.default' (reads or writes files)" in r.json()["detail"], r.text
        tags = client.get_model_version("tiny-forger", "1").tags
        assert not any(k.startswith("invariance.") for k in tags), tags
    finally:
        svc.stop()


def test_a_deeply_nested_mlmodel_is_a_clear_refusal(tracking, registered, tmp_path):
    """Issue 19: an MLmodel file nested 5,000 levels deep is refused with a message (exit 2, one line), not a
    parser's RecursionError and its traceback."""
    folder = tmp_path / "deep"
    folder.mkdir()
    (folder / "MLmodel").write_text("flavors: " + "[" * 5000 + "]" * 5000 + "\n")
    export_onnx(PlainCNN(), IMAGE_SHAPE, folder / "model.onnx")
    client = registered["client"]
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), "deep")
    client.create_registered_model("tiny-deep")
    client.create_model_version("tiny-deep", f"runs:/{run.info.run_id}/deep", run_id=run.info.run_id)
    result = cli(tracking, "audit", "models:/tiny-deep/1", "--group", "flip", *FAST)
    assert_bad_input(result, "nested at most 64 levels")


def test_service_without_allow_list_refuses_model_uri(api):
    """The shared service has no AUDIT_MLFLOW_ALLOWED_URIS: the feature is off, whatever URI is named."""
    parts = {"spec": (None, json.dumps(tiny_spec())), "model_uri": (None, "models:/tiny-onnx/1")}
    r = api("POST", "/audit", files=parts)
    assert r.status_code == 403 and "AUDIT_MLFLOW_ALLOWED_URIS" in r.json()["detail"], r.text
    r = api("POST", "/audit", files={"spec": parts["spec"], "mlflow_write_back": (None, "true")})
    assert r.status_code == 422 and r.json()["field"] == "mlflow_write_back", r.text


def test_worker_write_back_reports_a_registry_it_cannot_reach(tmp_path):
    """The worker's write-back on its own: a registry no longer allowed, or one that does not answer, is a
    ``failed`` outcome with the reason (the audit stands); nothing is raised."""
    from audit_service.jobs.settings import Settings
    from audit_service.jobs.write_back import write_back

    request = {"registry": "main", "uri": "models:/tiny-onnx/1", "directory": "mlflow-artifacts:/x", "file": "m.onnx",
               "flavor": "onnx", "version": "1", "run_id": None}
    report = stored_report()  # a real audit's report
    gone = write_back(request, report, Settings(data_dir=str(tmp_path), mlflow_allowed_uris="other=http://x"))
    assert gone["status"] == "failed" and gone["attempts"] == 0 and "no longer" in gone["error"], gone
    dead = f"http://127.0.0.1:{free_port()}"
    down = write_back(request, report, Settings(data_dir=str(tmp_path), mlflow_allowed_uris=f"main={dead}",
                                                write_back_rules="default:tiny-*"), pause_s=0)
    assert down["status"] == "failed" and down["attempts"] == 3 and down["uri"] == "models:/tiny-onnx/1", down
    assert "Connection" in down["error"] or "connect" in down["error"], down
    cancelled = write_back(request, report, Settings(data_dir=str(tmp_path), mlflow_allowed_uris=f"main={dead}",
                                                     write_back_rules="default:tiny-*"), before_attempt=lambda: False)
    assert cancelled["status"] == "failed" and cancelled["attempts"] == 0 and "cancelled" in cancelled["error"]
    revoked = write_back(request, report, Settings(data_dir=str(tmp_path), mlflow_allowed_uris=f"main={dead}",
                                                   write_back_rules="default:other-*"), pause_s=0)
    assert revoked["status"] == "failed" and revoked["attempts"] == 0 and "AUDIT_WRITE_BACK_RULES" in revoked["error"]


def test_write_back_rules_parse_and_match():
    """The operator's rules: ``tenant:pattern`` (any registry) and ``tenant:registry:pattern``, globs over the model
    name (``runs:/RUN_ID`` for a run); a malformed entry is an error that names it, and so is an unknown label."""
    from audit_service.jobs.settings import Settings
    from audit_service.jobs.write_back import WriteBackConfigError, WriteBackPolicy, write_back_target

    policy = WriteBackPolicy.from_settings(Settings(write_back_rules="alice:vision-*, bob:prod:bob-net  # comment",
                                                    write_back_require="genuine", write_back_require_confident=1))
    assert write_back_target("models:/vision-a@champion") == "vision-a"
    assert write_back_target("models:/vision-a/3") == "vision-a"
    assert write_back_target("runs:/abc/x.onnx") == "runs:/abc"
    assert policy.permits("alice", "main", "vision-a") and not policy.permits("alice", "main", "bob-net")
    assert policy.permits("bob", "prod", "bob-net") and not policy.permits("bob", "main", "bob-net")
    assert not policy.permits("carol", "main", "vision-a")
    verdict = stored_report().verdict  # a real audit's
    assert verdict.label == "genuine" and not verdict.borderline
    assert policy.passed(verdict) is True
    assert policy.passed(verdict.model_copy(update={"borderline": True})) is False  # the operator's strict gate
    learned = verdict.model_copy(update={"label": "learned", "require": ["learned"]})
    assert policy.passed(learned) is False  # the client's require is not read
    with pytest.raises(WriteBackConfigError, match="entry 2"):
        WriteBackPolicy.from_settings(Settings(write_back_rules="alice:x,bob:"))
    with pytest.raises(WriteBackConfigError, match="AUDIT_WRITE_BACK_REQUIRE"):
        WriteBackPolicy.from_settings(Settings(write_back_require="genuine,great"))
    from audit_service.service.auth import check_bind  # serve refuses to start on a broken rule, naming it

    assert "entry 2" in check_bind("127.0.0.1", Settings(write_back_rules="alice:x,bob:"))
    assert check_bind("127.0.0.1", Settings(write_back_rules="alice:x")) is None


ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef"


def test_write_back_follows_the_operators_rules(tracking, registered, tmp_path):
    """Issue 19: which tenant may tag which registered model is the operator's (AUDIT_WRITE_BACK_RULES): another
    tenant's write-back is a 403 and leaves no tag; ``invariance.passed`` follows the operator's gate, so a
    not-invariant model audited with ``require`` set to every label is tagged passed=false (before: passed=true,
    any tenant, any model); the tags name the tenant and the job, and the outcome is on the job."""
    client = registered["client"]
    svc = Service(tmp_path / "data", workers=1, web_workers=1, AUDIT_MLFLOW_ALLOWED_URIS=f"main={tracking}",
                  AUDIT_TOKENS=f"{ALICE}:alice,{BOB}:bob", AUDIT_WRITE_BACK_RULES="alice:main:tiny-plain",
                  AUDIT_MAX_MODEL_MB=4, AUDIT_JOB_TIMEOUT_S=300, AUDIT_MAX_WAIT_S=120).start()
    every_label = ["genuine", "learned", "incidental", "undecided", "not_invariant", "trivial", "not_genuine"]
    spec = json.dumps(tiny_spec(require=every_label))

    def post(token: str, **form: str) -> requests.Response:
        parts = {k: (None, v) for k, v in {"spec": spec, **form}.items()}
        return requests.post(f"{svc.url}/audit?wait=120", files=parts, timeout=150,
                             headers={"Authorization": f"Bearer {token}"})

    try:
        refused = post(BOB, model_uri="models:/tiny-plain/1", mlflow_write_back="true")
        assert refused.status_code == 403 and refused.json()["field"] == "mlflow_write_back", refused.text
        assert "'bob'" in refused.json()["detail"] and "AUDIT_WRITE_BACK_RULES" in refused.json()["detail"]
        other = post(ALICE, model_uri="models:/tiny-onnx/1", mlflow_write_back="true")
        assert other.status_code == 403, other.text  # alice's rule names tiny-plain only
        assert not any(k.startswith("invariance.") for k in client.get_model_version("tiny-plain", "1").tags)

        r = post(ALICE, model_uri="models:/tiny-plain/1", mlflow_write_back="true")
        assert r.status_code == 200, r.text
        assert r.json()["verdict"] not in ("genuine", "learned") and r.json()["passed"] is True  # the client's gate
        job = requests.get(svc.url + r.headers["Location"], timeout=30,
                           headers={"Authorization": f"Bearer {ALICE}"}).json()
        tags = client.get_model_version("tiny-plain", "1").tags
        shown = {k: v for k, v in tags.items() if any(w in k for w in ("pass", "require", "tenant", "job"))}
        print(f"operator-gated tags: {shown}")
        assert tags["invariance.verdict"] == r.json()["verdict"] and tags["invariance.passed"] == "false", tags
        assert tags["invariance.require"] == "genuine,learned" and tags["invariance.gate"] == "operator", tags
        assert tags["invariance.client_require"] == ",".join(every_label), tags
        assert tags["invariance.tenant"] == "alice" and tags["invariance.job_id"] == job["id"], tags
        assert job["write_back"]["status"] == "written" and job["write_back"]["tags"]["invariance.passed"] == "false"
    finally:
        svc.stop()
