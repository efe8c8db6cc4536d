"""``audit-service audit``: exit codes 0 / 1 / 2, one-line errors, no tracebacks, the JSON report.

Runs the real console script in a subprocess, as a pipeline would.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from builders import (IMAGE_SHAPE, ConstantModel, NaNModel, OddOutputModel, OrbitAveragedCNN, PlainCNN, TwoInputModel,
                      export_onnx, export_torchscript)

CLI = [sys.executable, "-m", "audit_service.cli"]
FAST = ["--option", "n_probes=16", "--option", "n_noise_probes=16", "--option", "ig_steps=4",
        "--option", "jacobian_probes=4", "--shift", "none"]


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    probes = rng.normal(size=(16, *IMAGE_SHAPE)).astype(np.float32)
    np.save(d / "probes.npy", probes)
    np.savez(d / "probes.npz", x=probes, y=rng.integers(0, 10, 16))
    return {
        "dir": d,
        "genuine": export_onnx(OrbitAveragedCNN(PlainCNN(), group="D4"), IMAGE_SHAPE, d / "genuine.onnx"),
        "plain": export_onnx(PlainCNN(), IMAGE_SHAPE, d / "plain.onnx"),
        "plain_ts": export_torchscript(PlainCNN(), IMAGE_SHAPE, d / "plain.pt"),
        "probes": d / "probes.npy",
        "probes_npz": d / "probes.npz",
    }


def assert_bad_input(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr            # one line, no traceback
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), lines[0]


def test_audit_writes_report_and_passes_gate(files, tmp_path):
    out = tmp_path / "report.json"
    r = cli("audit", files["genuine"], "--group", "D4", "--probes", files["probes"], *FAST,
            "--output", out, "--require", "genuine")
    assert r.returncode == 0, r.stderr
    assert "verdict: genuine" in r.stdout
    report = json.loads(out.read_text())
    assert report["verdict"]["label"] == "genuine" and report["verdict"]["passed"] is True
    assert report["group"]["order"] == 8


@pytest.mark.slow  # --require on a failing model; test_default_gate_fail_exits_one_as_printed fails the default gate
def test_gate_failure_exits_one(files):
    r = cli("audit", files["plain"], "--group", "C4", "--probes", files["probes_npz"], *FAST, "--require", "genuine")
    assert r.returncode == 1, r.stderr
    assert "gate failed" in r.stderr


def test_json_group_spec_from_file_and_stdout_json(files, tmp_path):
    spec = tmp_path / "group.json"
    spec.write_text(json.dumps({"name": "translation", "order": 4, "step": 3}))
    r = cli("audit", files["plain_ts"], "--group", f"@{spec}", "--probes", files["probes"], *FAST, "--json")
    report = json.loads(r.stdout)   # stdout is the JSON alone: the estimate and the gate go to stderr
    assert report["group"]["order"] == 4 and report["model"]["format"] == "torchscript"
    assert r.returncode == (0 if report["verdict"]["passed"] else 1), r.stderr


def test_default_gate_fail_exits_one_as_printed(files):
    """Issue 23: without --require the summary still prints the default gate's PASS / FAIL; the exit status
    says the same (1 on FAIL), so a pipeline stops on a model whose invariance is absent."""
    r = cli("audit", files["plain"], "--group", "C4", "--probes", files["probes_npz"], *FAST)
    assert "(FAIL for require=genuine,learned" in r.stdout, r.stdout
    assert r.returncode == 1, r.stderr
    assert re.search(r"gate failed: verdict '\w+' is not in \['genuine', 'learned'\]", r.stderr), r.stderr
    passed = cli("audit", files["genuine"], "--group", "D4", "--probes", files["probes"], *FAST)
    assert "(PASS for require=genuine,learned" in passed.stdout and passed.returncode == 0, passed.stderr


@pytest.mark.slow  # the genuine D4 audit again (test_audit_writes_report_and_passes_gate): 10 CPU s
def test_estimate_is_printed_before_the_audit(files):
    """Issue 23, cost before work: the CLI says what the audit will spend (on stderr, before the sweep)."""
    r = cli("audit", files["genuine"], "--group", "D4", "--probes", files["probes"], *FAST)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("audit-service: estimate:"))
    # D4 (8 elements) over 16 clean probes and 16 noise probes, forward-only: 8 x 32 samples
    assert "256 forward passes (8 group elements x 2 conditions" in line, line
    assert " ms a sample" in line and "about " in line


@pytest.mark.slow  # a CLI audit that renders the HTML report: 21 CPU s
def test_quiet_prints_nothing_but_the_html_report_is_written(files, tmp_path):
    """Issue 23: --quiet prints nothing (no estimate, no table); --html writes the report a person reads."""
    html = tmp_path / "report.html"
    r = cli("audit", files["genuine"], "--group", "D4", "--probes", files["probes"], *FAST, "--quiet", "--html", html)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""
    page = html.read_text()
    assert page.lstrip().lower().startswith("<!doctype html") and "genuine" in page
    failed = cli("audit", files["plain"], "--group", "C4", "--probes", files["probes_npz"], *FAST, "-q")
    assert failed.returncode == 1 and failed.stdout == ""
    lines = [ln for ln in failed.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("audit-service: gate failed: verdict "), failed.stderr


# ----------------------------------------------------------------------------- bad input: exit 2
def test_truncated_model(files, tmp_path):
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(files["plain"].read_bytes()[:200])
    assert_bad_input(cli("audit", bad, "--group", "C4", *FAST), "onnx")


@pytest.mark.slow  # a CLI run (6 CPU s); the loader's own test: test_runtime.py::test_random_bytes_are_refused
def test_random_bytes_model(tmp_path):
    bad = tmp_path / "noise.bin"
    bad.write_bytes(np.random.default_rng(1).bytes(4096))
    assert_bad_input(cli("audit", bad, "--group", "C4", *FAST), "expected")


class _Marker:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ.get("MARKER", "/tmp/never")),))


@pytest.mark.slow  # a CLI run; test_runtime.py::test_pickle_is_refused_without_unpickling
def test_pickle_is_refused_and_never_loaded(tmp_path):
    marker = tmp_path / "unpickled"
    bad = tmp_path / "model.pt"
    os.environ["MARKER"] = str(marker)
    bad.write_bytes(pickle.dumps(_Marker()))
    assert_bad_input(cli("audit", bad, "--group", "C4", *FAST), "pickle")
    assert not marker.exists()


@pytest.mark.slow  # CLI runs (14 CPU s); test_runtime.py and test_external_data.py read external data
def test_onnx_with_external_data(files, tmp_path):
    """Issue 18: the data file beside the graph is found; one the graph names outside its folder is refused."""
    model = onnx.load(str(files["plain"]))
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    result = cli("audit", path, "--group", "C4", *FAST, "--json")
    assert result.returncode in (0, 1), result.stderr
    assert json.loads(result.stdout)["model"]["gradient_path"].startswith("autograd")
    graph = onnx.load(str(path), load_external_data=False)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    (tmp_path / "climbs.onnx").write_bytes(graph.SerializeToString())
    assert_bad_input(cli("audit", tmp_path / "climbs.onnx", "--group", "C4", *FAST), "'../weights.bin'",
                     "plain file name", "external data")


@pytest.mark.slow  # a CLI run; test_runtime.py refuses two inputs
def test_two_input_model(tmp_path):
    path = export_onnx(TwoInputModel(), list(TwoInputModel.input_shapes), tmp_path / "two.onnx")
    assert_bad_input(cli("audit", path, "--group", "C4", *FAST), "input")


@pytest.mark.slow  # a CLI run; test_runtime.py refuses odd outputs
def test_output_not_n_by_c(tmp_path):
    path = export_onnx(OddOutputModel(kind="3d"), IMAGE_SHAPE, tmp_path / "odd.onnx")
    assert_bad_input(cli("audit", path, "--group", "C4", *FAST), "(N, C)")


@pytest.mark.slow  # a CLI run; test_runtime.py finds NaN logits
def test_nan_model(tmp_path):
    path = export_onnx(NaNModel(), IMAGE_SHAPE, tmp_path / "nan.onnx")
    assert_bad_input(cli("audit", path, "--group", "C4", *FAST), "nan")


@pytest.mark.slow  # CLI runs (13 CPU s); test_runtime.py::test_probes_of_the_wrong_shape_are_a_probe_error
def test_probes_of_wrong_shape_and_dtype(files, tmp_path):
    wrong_shape = tmp_path / "shape.npy"
    np.save(wrong_shape, np.zeros((4, 1, 10, 12), dtype=np.float32))
    assert_bad_input(cli("audit", files["plain"], "--group", "C4", "--probes", wrong_shape, *FAST),
                     "probes", "(1, 12, 12)")
    wrong_dtype = tmp_path / "dtype.npy"
    np.save(wrong_dtype, np.zeros((4, *IMAGE_SHAPE), dtype=np.int64))
    assert_bad_input(cli("audit", files["plain"], "--group", "C4", "--probes", wrong_dtype, *FAST), "float32")


def test_unknown_group(files):
    assert_bad_input(cli("audit", files["plain"], "--group", "C7", *FAST), "group", "C4")


@pytest.mark.slow  # CLI runs (12 CPU s); test_groups.py refuses groups that do not fit (test_c4_non_square)
def test_group_that_does_not_fit_the_input(files, tmp_path):
    step = json.dumps({"name": "translation", "order": 2, "step": 40})
    assert_bad_input(cli("audit", files["plain"], "--group", step, *FAST), "step")
    wide = export_onnx(ConstantModel(), (1, 12, 16), tmp_path / "wide.onnx")
    assert_bad_input(cli("audit", wide, "--group", "C4", *FAST), "square")


def test_missing_model_file(tmp_path):
    """Issue 23: told at once: the path is checked before torch is imported (asserted on the import log, not on
    the clock, which on a shared machine measures the neighbours)."""
    result = cli("audit", tmp_path / "absent.onnx", "--group", "C4", *FAST)
    assert_bad_input(result, "absent.onnx", "no such file")
    no_torch = subprocess.run([sys.executable, "-X", "importtime", *CLI[1:], "audit", str(tmp_path / "absent.onnx"),
                               "--group", "C4"], capture_output=True, text=True, timeout=60)
    assert no_torch.returncode == 2
    assert not re.search(r"\|\s+torch\s*$", no_torch.stderr, re.M), "torch was imported"
    probes = tmp_path / "model.onnx"
    probes.write_bytes(b"x")
    assert_bad_input(cli("audit", probes, "--group", "C4", "--probes", tmp_path / "nope.npy"), "probes",
                     "nope.npy", "no such file")


def test_bad_option_and_shift(files):
    assert_bad_input(cli("audit", files["plain"], "--group", "C4", "--option", "ig_steps=0"), "ig_steps")
    assert_bad_input(cli("audit", files["plain"], "--group", "C4", "--shift", "fog@3"), "shift")
    assert_bad_input(cli("audit", files["plain"], "--group", "C4", "--shift", "blur@9"), "severity")


@pytest.mark.parametrize("verdict, code", [
    ({"label": "label-from-a-newer-engine", "passed": True, "require": ["genuine"], "reasons": []}, 0),
    ({"label": "genuine", "passed": False, "require": "not-a-list", "reasons": 7}, 1),
    ("not-a-verdict", 1),
])
def test_submit_gates_a_report_the_models_refuse(tmp_path, monkeypatch, capsys, verdict, code):
    """The submit gate reads the served report's plain dict (adapters.client.gate): a stored report the engine's
    models would refuse still gives its verdict and exit status, not a traceback and the gate-failed code."""
    from audit_service.adapters import client as client_module
    from audit_service.cli.main import main

    class FakeClient:
        def __init__(self, url, token=None):
            pass

        def submit(self, *args, **kwargs):
            return {"id": "j1", "status": "queued"}

        def wait(self, job_id, progress=None, timeout=None):
            return {"id": job_id, "status": "succeeded"}

        def report(self, job_id):
            return {"schema_version": "0", "verdict": verdict, "sections": "malformed"}

    monkeypatch.setattr(client_module, "AuditClient", FakeClient)
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    assert main(["submit", str(model), "--group", "C4", "--url", "http://unused", "--quiet"]) == code
    out = json.loads(capsys.readouterr().out)
    assert out["id"] == "j1" and out["passed"] is (code == 0)
    assert out["verdict"] == (verdict["label"] if isinstance(verdict, dict) else "unknown")
