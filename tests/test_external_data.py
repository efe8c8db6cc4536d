"""Issue 18: ONNX external data, accepted only as plain file names in the model's own folder.

The runtime reads the data files a graph names from the model file's folder into the graph (onnxruntime and
the onnx2torch twin then see one self-contained model); the report's sha256 covers the data; a location that
is absolute, climbs out with ``..``, names a subfolder or a file outside the folder, an offset or length
outside the file, a FIFO, or a total over the size cap is refused with a message naming the tensor and the
location, through the runtime, the CLI and a running service. The exporters' defaults (``torch.onnx.export``
with no flags, stock torchvision models) are audited with integrated gradients through the CLI and the
service in the slow part at the end; ``tests/test_mlflow.py`` has ``mlflow.onnx.log_model``'s default.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import onnx
import pytest
import requests
import torch

from audit_service.engine.errors import ModelError
from audit_service.engine.runtime import load_model, model_files_sha256, model_sha256
from builders import IMAGE_SHAPE, PlainCNN, export_onnx
from conftest import Service, tiny_spec

CLI = [sys.executable, "-m", "audit_service.cli"]
TINY = ["--option", "n_probes=4", "--option", "n_noise_probes=4", "--option", "ig_steps=2",
        "--option", "jacobian_probes=1", "--option", "bootstrap=0", "--shift", "none", "--quiet"]
#: the twin's tolerance against onnxruntime (runtime.onnx_convert.MATCH_TOLERANCE)
TOLERANCE = 1e-4


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def save_external(model: onnx.ModelProto, path: Path, location: str = "weights.bin") -> Path:
    """``model`` saved as ``path`` with every initializer in ``location`` beside it (onnx's own writer)."""
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path


def relocated(path: Path, out: Path, **entries: str) -> Path:
    """The graph of ``path`` (its data not loaded) with these external-data entries set on every tensor."""
    graph = onnx.load(str(path), load_external_data=False)
    for tensor in graph.graph.initializer:
        for key, value in entries.items():
            entry = next((e for e in tensor.external_data if e.key == key), None) or tensor.external_data.add()
            entry.key, entry.value = key, value
    out.write_bytes(graph.SerializeToString())
    return out


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict[str, Path]:
    """A small CNN self-contained, and the same saved with its weights in ``weights.bin`` beside it."""
    d = tmp_path_factory.mktemp("external")
    inline = export_onnx(PlainCNN(), IMAGE_SHAPE, d / "inline.onnx")
    external = save_external(onnx.load(str(inline)), d / "model.onnx")
    return {"dir": d, "inline": inline, "external": external, "data": d / "weights.bin"}


# ============================================================================ runtime
def test_data_beside_the_model_is_read_into_the_graph(plain):
    runner = load_model(plain["external"], device="cpu")
    reference = load_model(plain["inline"], device="cpu")
    x = torch.rand(5, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(0))
    assert torch.equal(runner.logits(x), reference.logits(x))
    assert runner.external_data == ("weights.bin",)
    module = runner.torch_module()  # the twin converts the merged graph
    assert module is not None and runner.twin_error is not None and runner.twin_error <= TOLERANCE
    graph = plain["external"].read_bytes()
    data = plain["data"].read_bytes()
    # the identity covers the data: one definition, from bytes or from the files the engine streams
    assert runner.sha256 == model_sha256(graph, {"weights.bin": data})
    assert runner.sha256 == model_files_sha256(plain["external"], {"weights.bin": plain["data"]})[0]
    assert runner.sha256 != hashlib.sha256(graph).hexdigest()
    assert runner.sha256 != model_sha256(graph, {"weights.bin": data[:-1] + b"\x01"})
    assert runner.sha256 != model_sha256(graph, {"other.bin": data})
    # without data, the identity is still the file's plain sha256
    assert reference.sha256 == hashlib.sha256(plain["inline"].read_bytes()).hexdigest() \
        == model_files_sha256(plain["inline"])[0] == model_sha256(plain["inline"].read_bytes())


@pytest.mark.parametrize("location, why", [
    ("/etc/passwd", "is an absolute path"),
    ("../weights.bin", "climbs out of the model's folder with '..'"),
    ("..", "climbs out of the model's folder with '..'"),
    ("sub/weights.bin", "names a subfolder"),
    ("sub\\weights.bin", "names a subfolder"),
    ("C:weights.bin", "is an absolute path"),
    ("weights\nbin", "contains a control character"),
    ("w" * 300, "is longer than 255 bytes"),
])
def test_a_location_that_is_not_a_plain_name_is_refused_by_name(plain, tmp_path, location, why):
    bad = relocated(plain["external"], tmp_path / "bad.onnx", location=location)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "weights.bin").write_bytes(plain["data"].read_bytes())  # present: still refused
    with pytest.raises(ModelError) as err:
        load_model(bad, device="cpu")
    message = err.value.message
    assert f"its location {location[:300]!r} {why}" in message, message
    assert "initializer '" in message and "plain file name" in message and "save_as_external_data=False" in message


def test_a_file_outside_the_folder_is_not_found_even_when_it_exists(plain, tmp_path):
    """The graph in a subfolder, its data file one level up: plain names are looked up beside the graph only."""
    (tmp_path / "inner").mkdir()
    (tmp_path / "weights.bin").write_bytes(plain["data"].read_bytes())
    graph = tmp_path / "inner" / "model.onnx"
    graph.write_bytes(plain["external"].read_bytes())
    with pytest.raises(ModelError, match=r"external data file 'weights.bin' of initializer '[^']+' beside the "
                                         r"model \(in its own folder\), but there is no such file"):
        load_model(graph, device="cpu")


def test_offsets_lengths_and_kinds_of_file_are_checked(plain, tmp_path):
    size = plain["data"].stat().st_size
    (tmp_path / "weights.bin").write_bytes(plain["data"].read_bytes())
    cases = [
        ({"offset": str(size)}, r"to lie inside 'weights.bin' \(\d+ bytes\), but offset \d+ \+ length \d+ runs past"),
        ({"length": "3"}, r"in 'weights.bin' to be \d+ bytes \(its type and dims \[.*\]\), but its length is 3"),
        ({"offset": "-1"}, r"offset of initializer '[^']+''s external data in 'weights.bin' to be a non-negative"),
        ({"basepath": "/etc"}, r"to name only location, offset, length, checksum, but it names 'basepath'"),
    ]
    for entries, pattern in cases:
        bad = relocated(plain["external"], tmp_path / "bad.onnx", **entries)
        with pytest.raises(ModelError, match=pattern):
            load_model(bad, device="cpu")
    os.mkfifo(tmp_path / "fifo.bin")  # opened without blocking, refused unread
    bad = relocated(plain["external"], tmp_path / "bad.onnx", location="fifo.bin")
    with pytest.raises(ModelError, match=r"'fifo.bin' of initializer '[^']+' to be a regular file"):
        load_model(bad, device="cpu")
    (tmp_path / "folder.bin").mkdir()
    bad = relocated(plain["external"], tmp_path / "bad.onnx", location="folder.bin")
    with pytest.raises(ModelError, match=r"'folder.bin' of initializer '[^']+' to be a regular file"):
        load_model(bad, device="cpu")


def test_the_size_cap_counts_the_graph_and_its_data(plain, monkeypatch):
    graph, data = plain["external"].stat().st_size, plain["data"].stat().st_size
    with pytest.raises(ModelError, match=rf"at most {graph + data - 1} bytes .* with its external data, but the "
                                         rf"graph \({graph} bytes\) and its data files come to at least "
                                         rf"{graph + data} bytes by 'weights.bin'; raise the cap with "
                                         r"AUDIT_MAX_MODEL_BYTES"):
        load_model(plain["external"], device="cpu", max_bytes=graph + data - 1)
    monkeypatch.setenv("AUDIT_MAX_MODEL_BYTES", str(graph + data - 1))
    with pytest.raises(ModelError, match="with its external data"):
        load_model(plain["external"], device="cpu")
    monkeypatch.setenv("AUDIT_MAX_MODEL_BYTES", str(graph + data))
    assert load_model(plain["external"], device="cpu").external_data == ("weights.bin",)
    with pytest.raises(ModelError, match="larger by 'weights.bin'"):
        model_files_sha256(plain["external"], {"weights.bin": plain["data"]}, graph + data - 1)


# ============================================================================ CLI
@pytest.mark.slow  # three CLI audits: 23 CPU s
def test_cli_finds_the_data_beside_the_model_and_refuses_a_location_outside(plain, tmp_path):
    out = tmp_path / "report.json"
    result = cli("audit", plain["external"], "--group", "C4", *TINY, "--output", out)
    assert result.returncode in (0, 1), result.stderr[-2000:]
    model = json.loads(out.read_text())["model"]
    assert model["sha256"] == model_files_sha256(plain["external"], {"weights.bin": plain["data"]})[0]
    assert model["gradient_path"].startswith("autograd") and model["twin_max_error"] <= TOLERANCE
    for location in ("/etc/passwd", "../weights.bin"):
        bad = relocated(plain["external"], tmp_path / "bad.onnx", location=location)
        one_line_error(cli("audit", bad, "--group", "C4", *TINY), f"its location {location!r}", "initializer '")
    (tmp_path / "inner").mkdir()
    moved = tmp_path / "inner" / "model.onnx"
    moved.write_bytes(plain["external"].read_bytes())
    one_line_error(cli("audit", moved, "--group", "C4", *TINY), "external data file 'weights.bin'",
                   "no such file")


# ============================================================================ the sandbox and its cage
def _validate_in_sandbox(tmp_path: Path, plain: dict, granted: bool) -> dict:
    """The submission check as the worker runs it (``jobs.sandbox``, the model in its cage): the model and
    its data file linked into the model's folder, the data file listed in ``model_data`` or not."""
    from audit_service.jobs.launcher import Limits, launch, task_env
    from audit_service.jobs.settings import Settings
    from audit_service.jobs.submission import link_model_folder

    blobs = tmp_path / "blobs"
    blobs.mkdir(parents=True)
    model_blob, data_blob = blobs / "m", blobs / "d"
    model_blob.write_bytes(plain["external"].read_bytes())
    data_blob.write_bytes(plain["data"].read_bytes())
    work = tmp_path / "work"
    (work / "tmp").mkdir(parents=True)
    model, links = link_model_folder(work / "model", model_blob, "model.onnx", {"weights.bin": data_blob})
    (work / "task.json").write_text(json.dumps({"kind": "validate", "model": str(model), "input_shape": None,
                                                "model_data": [str(p) for p in links] if granted else []}))
    settings = Settings.from_env({}, data_dir=tmp_path)
    handle = launch(work, Limits(memory_mb=0, cpu_s=120, env=task_env(work, settings), file_mb=16), warm=False)
    assert handle.wait(180) == 0, (work / "stderr.log").read_text()[-3000:] if (work / "stderr.log").exists() else ""
    return json.loads((work / "result.json").read_text())


@pytest.mark.skipif(__import__("audit_service.jobs.confine", fromlist=["x"]).landlock_abi() == 0,
                    reason="this kernel offers no Landlock: nothing to grant")
def test_the_cage_reads_exactly_the_data_files_it_is_granted(plain, tmp_path):
    granted = _validate_in_sandbox(tmp_path / "granted", plain, granted=True)
    assert granted["ok"] and granted["external_data"] == ["weights.bin"], granted
    assert granted["report"]["format"] == "onnx"
    # the same folder, the data file beside the model but not granted: the kernel refuses the cage's open
    refused = _validate_in_sandbox(tmp_path / "refused", plain, granted=False)
    assert not refused["ok"], refused
    assert "'weights.bin'" in refused["error"]["message"] and "permission denied" in refused["error"]["message"]


# ============================================================================ service (the shared one)
def _post(api, model: Path, data: list[tuple[str, bytes]] = (), spec: dict | None = None, wait: int = 0,
          **form: str):
    parts = [("model", ("model.onnx", model.read_bytes())),
             *[("model_data", (name, content)) for name, content in data],
             ("spec", (None, json.dumps(spec or tiny_spec()))), *[(k, (None, v)) for k, v in form.items()]]
    return api("POST", f"/audit?wait={wait}", files=parts)


def _staged_leftovers(service) -> list[str]:
    uploads = Path(service.data_dir) / "uploads"
    return sorted(p.name for p in uploads.iterdir()) if uploads.exists() else []


def test_service_takes_model_data_parts_and_audits_the_same_model(service, api, plain):
    data = [("weights.bin", plain["data"].read_bytes())]
    r = _post(api, plain["external"], data, wait=120)
    assert r.status_code == 200, r.text
    job = api("GET", r.headers["Location"]).json()
    entry = job["inputs"]["model_data/weights.bin"]
    assert entry["filename"] == "weights.bin" and entry["format"] == "onnx_data"
    assert entry["sha256"] == hashlib.sha256(plain["data"].read_bytes()).hexdigest()
    report = api("GET", job["links"]["report"]).json()
    # the engine's digest of the staged files is the runtime's definition: the CLI's sha256 for the same files
    assert report["model"]["sha256"] == model_files_sha256(plain["external"], {"weights.bin": plain["data"]})[0]
    assert report["model"]["gradient_path"].startswith("autograd")
    symmetrized = api("GET", f"/audits/{job['id']}/symmetrized.onnx")  # built in the sandbox from model + data
    assert symmetrized.status_code == 200, symmetrized.text
    assert onnx.load_model_from_string(symmetrized.content).graph.node
    again = _post(api, plain["external"], data, wait=120)
    assert again.status_code == 200 and again.json()["id"] != job["id"]
    changed = _post(api, plain["external"], [("weights.bin", data[0][1][:-4] + b"\x00\x00\x80\x3f")], wait=0)
    assert changed.status_code == 202, changed.text  # other data: another audit, not the finished twin
    assert changed.json()["status"] != "succeeded"
    assert api("GET", f"/audits/{again.json()['id']}").json()["status"] == "succeeded"
    api("DELETE", f"/audits/{changed.json()['id']}")


def test_the_python_client_sends_the_data_files_the_graph_names(service, plain):
    """``AuditClient.submit`` (and ``audit-service submit``) finds the graph's data files beside the model and
    sends them as ``model_data`` parts: a default export needs no extra step."""
    from audit_service.adapters.client import AuditClient, external_data_files

    assert external_data_files(plain["external"]) == ["weights.bin"]
    job = AuditClient(service.url, timeout=120).submit(plain["external"], json.dumps(tiny_spec("flip")), wait=120)
    assert job["status"] == "succeeded", job
    assert job["report"]["model"]["sha256"] == model_files_sha256(plain["external"],
                                                                 {"weights.bin": plain["data"]})[0]


@pytest.mark.parametrize("case", ["missing", "extra", "bad name", "model's own name", "twice", "absolute",
                                  "climbs", "over the cap", "form field"])
def test_service_refuses_bad_model_data_and_keeps_nothing(service, api, plain, tmp_path, case):
    data = [("weights.bin", plain["data"].read_bytes())]
    model, status, field, fragment = plain["external"], 422, "model_data", None
    form: dict[str, str] = {}
    if case == "missing":
        data, field, fragment = [], "model", "external data file 'weights.bin' of initializer '"
    elif case == "extra":
        data, fragment = [*data, ("notes.txt", b"hello")], "'notes.txt' is not (the graph names 'weights.bin')"
    elif case == "bad name":
        data, fragment = [("../weights.bin", data[0][1])], "'../weights.bin' climbs out of the model's folder"
    elif case == "model's own name":
        data, fragment = [("model.onnx", data[0][1])], "'model.onnx' is the name the model itself takes"
    elif case == "twice":
        data, fragment = [*data, *data], "'weights.bin' comes twice"
    elif case == "absolute":
        model = relocated(plain["external"], tmp_path / "abs.onnx", location="/etc/passwd")
        data, field, fragment = [], "model", "its location '/etc/passwd' is an absolute path"
    elif case == "climbs":
        model = relocated(plain["external"], tmp_path / "up.onnx", location="../weights.bin")
        field, fragment = "model", "its location '../weights.bin' climbs out of the model's folder"
    elif case == "over the cap":  # the shared service's AUDIT_MAX_MODEL_MB is 4
        data, status, fragment = [*data, ("big.bin", b"\0" * (4 << 20))], 413, "'big.bin' takes them past it"
    else:
        data, form, status, fragment = [], {"model_data": "weights.bin"}, 422, "but got a plain form field"
    before = _staged_leftovers(service)
    r = _post(api, model, data, **form)
    assert r.status_code == status, r.text
    problem = r.json()
    assert problem["field"] == field and fragment in problem["detail"], problem
    assert _staged_leftovers(service) == before  # staged together, removed together


# ============================================================================ the exporters' defaults (slow)
ZOO = {
    "resnet18": lambda: __import__("torchvision").models.resnet18(weights=None, num_classes=10),
    "mobilenet_v3_small": lambda: __import__("torchvision").models.mobilenet_v3_small(weights=None, num_classes=10),
    "efficientnet_b0": lambda: __import__("torchvision").models.efficientnet_b0(weights=None, num_classes=10),
}
ZOO_SPEC = {"group": "C4", "shifts": [], "options": {"n_probes": 4, "n_noise_probes": 4, "ig_steps": 2,
                                                     "jacobian_probes": 1, "bootstrap": 0, "device": "cpu"}}


@pytest.fixture(scope="module")
def defaults(tmp_path_factory):
    """name -> the folder holding ``model.onnx`` and ``model.onnx.data``, written by ``torch.onnx.export``
    with no flags at all (torch 2.9+: the dynamo exporter, the weights as external data), random weights."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            torch.manual_seed(0)
            model = ZOO[name]().eval()
            folder = tmp_path_factory.mktemp(name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (torch.rand(2, 3, 32, 32),), str(folder / "model.onnx"))
            made[name] = folder
        return made[name]

    return get


@pytest.fixture(scope="module")
def big_service(tmp_path_factory):
    """A service with the default model cap (the shared one caps models at 4 MiB)."""
    svc = Service(tmp_path_factory.mktemp("zoo-service") / "data", workers=1, web_workers=1,
                  AUDIT_JOB_TIMEOUT_S=600, AUDIT_MAX_WAIT_S=600, AUDIT_VALIDATE_TIMEOUT_S=300).start()
    yield svc
    svc.stop()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_default_torch_onnx_export_audits_through_cli_and_service(defaults, big_service, name):
    folder = defaults(name)
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["model.onnx", "model.onnx.data"], files  # the exporter's default: weights beside the graph
    spec = folder / "spec.json"
    spec.write_text(json.dumps(ZOO_SPEC))
    out = folder / "report.json"
    started = time.monotonic()
    result = cli("audit", folder / "model.onnx", "--spec", spec, "--quiet", "--output", out)
    assert result.returncode in (0, 1), result.stderr[-3000:]
    cli_model = json.loads(out.read_text())["model"]
    assert cli_model["gradient_path"].startswith("autograd"), cli_model
    assert cli_model["twin_max_error"] <= TOLERANCE, cli_model
    expected = model_files_sha256(folder / "model.onnx", {"model.onnx.data": folder / "model.onnx.data"})[0]
    assert cli_model["sha256"] == expected
    cli_s = time.monotonic() - started
    with open(folder / "model.onnx", "rb") as graph, open(folder / "model.onnx.data", "rb") as data:
        r = requests.post(f"{big_service.url}/audit?wait=600", timeout=700, files=[
            ("model", ("model.onnx", graph)), ("model_data", ("model.onnx.data", data)),
            ("spec", (None, json.dumps(ZOO_SPEC)))])
    assert r.status_code == 200, r.text
    report = requests.get(big_service.url + r.json()["links"]["report"], timeout=60).json()
    model = report["model"]
    assert model["gradient_path"].startswith("autograd") and model["twin_max_error"] <= TOLERANCE, model
    assert model["sha256"] == expected  # the service's identity of the model is the CLI's
    print(f"{name}: cli {cli_s:.1f} s, service {time.monotonic() - started - cli_s:.1f} s")
