"""``GET /audits/{id}/symmetrized.onnx`` on a real service: the orbit-averaged model of a finished audit,
built in the sandbox, downloads as ONNX whose logits do not change under the audit's group."""

from __future__ import annotations

import json

import numpy as np

from conftest import tiny_spec, wait_for_job


def _submit(api, models, name, reuse=True):
    data = {"spec": json.dumps(tiny_spec("C4"))}
    if not reuse:
        data["reuse"] = "false"
    return api("POST", "/audit", files={"model": (f"{name}.onnx", open(models[name], "rb"))}, data=data)


def test_symmetrized_model_of_a_finished_audit_is_invariant(api, models, service):
    import onnxruntime as ort
    from builders import IMAGE_SHAPE

    r = _submit(api, models, "plain")
    assert r.status_code in (200, 202), r.text
    job = wait_for_job(api, r.json()["id"])
    assert job["status"] == "succeeded", job

    r = api("GET", f"/audits/{job['id']}/symmetrized.onnx", timeout=300)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "application/octet-stream"
    session = ort.InferenceSession(r.content, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((5, *IMAGE_SHAPE), dtype=np.float32)
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: x})[0]
    assert logits.shape[0] == 5
    for k in (1, 2, 3):
        rotated = np.ascontiguousarray(np.rot90(x, k, axes=(-2, -1)))
        np.testing.assert_allclose(session.run(None, {name: rotated})[0], logits, rtol=1e-4, atol=1e-4)

    # issue 19: built once and stored; later downloads stream the stored file (no sandbox, no copy in memory)
    import time

    start = time.monotonic()
    again = api("GET", f"/audits/{job['id']}/symmetrized.onnx", stream=True, timeout=60)
    body = b"".join(again.iter_content(1 << 16))
    assert again.status_code == 200 and body == r.content and time.monotonic() - start < 2.0
    assert "attachment" in again.headers["Content-Disposition"]
    assert (service.data_dir / "symmetrized" / f"{job['id']}.onnx").is_file()
    assert api("DELETE", f"/audits/{job['id']}").status_code == 204
    assert not (service.data_dir / "symmetrized" / f"{job['id']}.onnx").exists()
    assert api("GET", f"/audits/{job['id']}/symmetrized.onnx").status_code == 404


def test_symmetrized_model_needs_a_succeeded_audit(api, models):
    assert api("GET", "/audits/nope/symmetrized.onnx").status_code == 404
    job = _submit(api, models, "plain2", reuse=False).json()
    assert api("DELETE", f"/audits/{job['id']}").status_code == 202  # cancelled before it can finish
    r = api("GET", f"/audits/{job['id']}/symmetrized.onnx")
    assert r.status_code == 409 and r.headers["Content-Type"] == "application/problem+json", r.text


def _succeeded_audit(api, path, group, name):
    r = api("POST", "/audit", files={"model": (name, open(path, "rb"))},
            data={"spec": json.dumps(tiny_spec(group)), "reuse": "false"})
    assert r.status_code in (200, 202), r.text
    job = wait_for_job(api, r.json()["id"])
    assert job["status"] == "succeeded", job
    return job


def test_symmetrized_model_of_an_interpolated_group_is_a_422_naming_the_group(api, models):
    job = _succeeded_audit(api, models["plain"], {"name": "rotation", "n_angles": 6}, "plain.onnx")
    r = api("GET", f"/audits/{job['id']}/symmetrized.onnx", timeout=300)
    assert r.status_code == 422 and r.headers["Content-Type"] == "application/problem+json", r.text
    problem = r.json()
    assert problem["field"] == "spec.group", problem
    assert "exact finite group" in problem["detail"] and "not be invariant" in problem["detail"], problem


def test_symmetrized_model_without_a_torch_twin_is_a_422_naming_the_model(api, tmp_path):
    from builders import IMAGE_SHAPE, PlainCNN, export_unconvertible

    path = export_unconvertible(PlainCNN(seed=4), IMAGE_SHAPE, tmp_path / "thresholded.onnx")
    job = _succeeded_audit(api, path, "C4", "thresholded.onnx")
    r = api("GET", f"/audits/{job['id']}/symmetrized.onnx", timeout=300)
    assert r.status_code == 422 and r.headers["Content-Type"] == "application/problem+json", r.text
    problem = r.json()
    assert problem["field"] == "model", problem
    assert "torch twin" in problem["detail"] and "ThresholdedRelu" in problem["detail"], problem
