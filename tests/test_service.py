"""The real service under gunicorn: submit real models, poll, read reports; errors as problem+json.

Every response is validated against ``openapi.yaml`` (the ``api`` fixture)."""

from __future__ import annotations

import json
import sqlite3
import signal
from pathlib import Path

import pytest
import requests

from conftest import ROOT, tiny_spec, wait_for_job
from polling import wait_for

# `make test-fast` keeps one of this file's submits on gunicorn (test_submit_poll_and_read_the_report; the fast lane's
# other audits on gunicorn are in test_service_symmetrized.py and test_external_data.py); the others here are slow


def submit(api, models, model="plain", spec=None, params=None, reuse=True, **files):
    parts = {"model": (Path(models[model]).name, open(models[model], "rb"))}
    for name, key in files.items():
        parts[name] = (Path(models[key]).name, open(models[key], "rb"))
    data = {"spec": json.dumps(spec if spec is not None else tiny_spec())}
    if not reuse:  # a fresh run even when an identical audit already finished
        data["reuse"] = "false"
    return api("POST", "/audit", files=parts, data=data, params=params)


@pytest.mark.slow
def test_operations_endpoints(api):
    assert api("GET", "/healthz").json() == {"status": "ok"}
    ready = api("GET", "/readyz").json()
    assert ready["status"] == "ready" and ready["checks"]["database"] == "ok"
    text = api("GET", "/openapi.yaml").text
    assert text == (ROOT / "openapi.yaml").read_text()
    metrics = api("GET", "/metrics").text
    for name in ("audit_jobs{state=\"queued\"}", "audit_queue_depth", "audit_duration_seconds_bucket"):
        assert name in metrics
    groups = api("GET", "/groups").json()["items"]
    assert {"C4", "D4", "translation"} <= {g["name"] for g in groups}
    assert {s["name"] for s in api("GET", "/shifts").json()["items"]} >= {"blur", "gaussian_noise", "blend"}


@pytest.mark.slow
def test_reference_endpoints(api):
    cards = api("GET", "/references").json()["items"]
    for card in cards:
        assert card["links"]["self"] == f"/references/{card['name']}"
        assert api("GET", card["links"]["self"]).json()["name"] == card["name"]
    missing = api("GET", "/references/no-such-run")
    assert missing.status_code == 404 and "no reference run" in missing.json()["detail"]
    assert api("POST", "/references/no-such-run/runs", json={"epochs": 1}).status_code == 404


def test_submit_poll_and_read_the_report(api, models, service):
    r = submit(api, models, probes="probes_labels")
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["Location"] == f"/audits/{job['id']}"
    assert job["status"] in ("queued", "running") and job["inputs"]["model"]["format"] == "onnx"
    assert job["passed"] is None
    assert len(job["inputs"]["model"]["sha256"]) == 64

    seen_running = False
    job_id = job["id"]

    def finished() -> dict | None:
        nonlocal seen_running
        current = api("GET", f"/audits/{job_id}").json()
        assert 0.0 <= current["progress"] <= 1.0
        seen_running |= current["status"] == "running"
        return current if current["status"] in ("succeeded", "failed", "cancelled") else None

    job = wait_for(finished, 180, 0.2, f"audit {job_id} to finish")
    assert job["status"] == "succeeded", job
    assert job["progress"] == 1.0 and job["timings"]["run_s"] > 0 and job["verdict"]
    assert job["links"]["report"] == f"/audits/{job['id']}/report"

    report = api("GET", job["links"]["report"]).json()
    assert report["verdict"]["label"] in ("genuine", "learned", "not_invariant", "trivial", "not_genuine")
    assert report["verdict"]["label"] == job["verdict"]
    assert job["passed"] is report["verdict"]["passed"]   # the gate, readable from the job alone
    assert {c["name"] for c in report["conditions"]} >= {"clean", "noise"}

    # issue 19: rendered once by the worker when the job finished, served from disk by the web tier
    assert (service.data_dir / "pages" / f"{job['id']}.html").is_file()
    html = api("GET", job["links"]["report_html"])
    assert html.headers["Content-Type"].startswith("text/html")
    body = html.text
    assert f"/audits/{job['id']}/report" in body and "audit-service.invalid" not in body
    assert body.index("Verdict") < body.index("Metrics per condition") < body.index("Saliency")
    assert "data:image/png;base64," in body and "Jacobian" in body
    negotiated = api("GET", job["links"]["report"], headers={"Accept": "text/html"})
    assert negotiated.headers["Content-Type"].startswith("text/html")
    assert api("GET", job["links"]["report"], headers={"Accept": "application/json"}).json() == report

    listing = api("GET", "/audits", params={"limit": 1}).json()
    assert listing["items"][0]["id"] and listing["total"] >= 1
    assert api("GET", "/audits", params={"status": "succeeded"}).json()["items"][0]["status"] == "succeeded"

    # a stored report this release's models refuse (an older release stored any JSON): its page is a 409 that
    # says so, never a 500, and the JSON is still served as stored
    refused = {**report, "verdict": "genuine"}
    with sqlite3.connect(service.data_dir / "jobs.sqlite3") as db:
        db.execute("UPDATE reports SET report_json = ? WHERE job_id = ?", (json.dumps(refused), job_id))
    (service.data_dir / "pages" / f"{job_id}.html").unlink()
    page = api("GET", job["links"]["report_html"])
    assert page.status_code == 409 and "does not match this release's report models" in page.json()["detail"], page.text
    as_stored = requests.get(service.url + job["links"]["report"], timeout=30)  # not the schema-checking client
    assert as_stored.status_code == 200 and as_stored.json()["verdict"] == "genuine"
    assert api("DELETE", f"/audits/{job_id}").status_code == 204


@pytest.mark.slow
def test_wait_answers_200_with_a_summary_and_the_report_at_its_link(api, models):
    r = submit(api, models, model="plain2", params={"wait": 120})
    assert r.status_code == 200, r.text
    summary = r.json()
    assert list(summary)[:4] == ["id", "status", "verdict", "passed"] and r.headers["Location"].startswith("/audits/")
    assert summary["verdict"] in ("genuine", "learned", "not_invariant", "not_genuine", "trivial")
    assert "noise" in summary["conditions"] and "DI" in summary["conditions"]["noise"]
    assert len(r.content) < 4000, "the compact answer stays small"
    report = api("GET", summary["links"]["report"]).json()
    assert report["verdict"]["label"] == summary["verdict"]


@pytest.mark.slow
def test_listing_is_newest_first_and_paginated(api, models):
    ids = [submit(api, models, spec=tiny_spec(options={**tiny_spec()["options"], "seed": i})).json()["id"]
           for i in range(3)]
    page = api("GET", "/audits", params={"limit": 2}).json()
    assert [j["id"] for j in page["items"]] == ids[::-1][:2]
    assert page["next"] == "/audits?limit=2&offset=2"
    second = api("GET", page["next"]).json()
    assert second["items"][0]["id"] == ids[0]
    for job_id in ids:  # cancel what we queued so other tests are not slowed down
        api("DELETE", f"/audits/{job_id}")


@pytest.mark.slow
@pytest.mark.parametrize("case, status, field", [
    ("bad_group", 422, "spec.group"),
    ("spec_not_json", 422, "spec"),
    ("unknown_spec_field", 422, "spec.colour"),
    ("garbage_model", 422, "model"),
    ("garbage_probes", 422, "probes"),
    ("missing_model", 400, "model"),
    ("missing_spec", 400, "spec"),
    ("oversize_probes", 413, "probes"),
    ("bad_wait", 400, "wait"),
    ("oversize_spec", 413, "spec"),
    ("too_many_shifts", 422, "spec.shifts"),
])
def test_bad_submissions_are_problems(api, models, case, status, field):
    spec = json.dumps(tiny_spec())
    files = {"model": ("m.onnx", open(models["plain"], "rb"))}
    data = {"spec": spec}
    params = None
    if case == "bad_group":
        data["spec"] = json.dumps({"group": "C5"})
    elif case == "spec_not_json":
        data["spec"] = "{group: C4"
    elif case == "unknown_spec_field":
        data["spec"] = json.dumps({"group": "C4", "colour": "red"})
    elif case == "garbage_model":
        files["model"] = ("m.onnx", open(models["garbage"], "rb"))
    elif case == "garbage_probes":
        files["probes"] = ("p.npy", open(models["garbage"], "rb"))
    elif case == "missing_model":
        files = {"probes": ("p.npy", open(models["probes"], "rb"))}
    elif case == "missing_spec":
        data = {}
    elif case == "oversize_probes":
        files["probes"] = ("p.npy", open(models["big_probes"], "rb"))
    elif case == "bad_wait":
        params = {"wait": "soon"}
    elif case == "too_many_shifts":  # issue 19: refused at submission, not as a job that runs out of time
        data["spec"] = json.dumps({**tiny_spec(), "shifts": [{"name": "gaussian_noise", "severity": 1}] * 100})
    elif case == "oversize_spec":  # issue 19: a spec is a few KiB; every job stores it and every list carries it
        data["spec"] = json.dumps({**tiny_spec(), "note": "x" * 70_000})
    r = api("POST", "/audit", files=files, data=data, params=params)
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"] == "application/problem+json"
    problem = r.json()
    assert problem["status"] == status and problem["field"] == field and problem["detail"]
    assert problem["instance"] == "/audit" and problem["type"].startswith("https://")


@pytest.mark.slow
def test_whole_body_over_the_cap_is_413(service):
    r = requests.post(service.url + "/audit", files={"model": ("m.onnx", b"x" * (9 * 1024 * 1024))},
                      data={"spec": "{}"}, timeout=60)
    assert r.status_code == 413 and r.json()["status"] == 413


@pytest.mark.slow
def test_not_multipart_unknown_ids_and_unfinished_reports(api, models):
    r = api("POST", "/audit", json={"group": "C4"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["detail"]
    assert api("GET", "/audits/nope").status_code == 404
    assert api("GET", "/audits/nope/report").status_code == 404
    assert api("DELETE", "/audits/nope").status_code == 404
    r = submit(api, models)
    job_id = r.json()["id"]
    report = api("GET", f"/audits/{job_id}/report")
    if report.status_code == 409:
        assert "report is ready when" in report.json()["detail"]
    api("DELETE", f"/audits/{job_id}")


@pytest.mark.slow
def test_cancel_then_delete(api, models):
    job = submit(api, models, model="plain2", reuse=False).json()
    r = api("DELETE", f"/audits/{job['id']}")
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    assert api("GET", f"/audits/{job['id']}/report").status_code == 409
    assert api("DELETE", f"/audits/{job['id']}").status_code == 204
    assert api("GET", f"/audits/{job['id']}").status_code == 404


@pytest.mark.slow
def test_a_hanging_model_times_out_and_only_that_job_fails(api, models):
    parts = {"model": ("hang.pt", open(models["hang"], "rb"))}
    r = api("POST", "/audit", files=parts, data={"spec": json.dumps(tiny_spec()), "timeout_s": "25"})
    assert r.status_code == 202, r.text
    hang = r.json()
    assert hang["timeout_s"] == 25
    healthy = submit(api, models).json()
    job = wait_for_job(api, hang["id"], timeout=120)
    assert job["status"] == "failed" and job["error"]["type"] == "timeout"
    assert "wall-clock limit of 25 s" in job["error"]["message"]
    assert api("GET", "/healthz").status_code == 200
    assert wait_for_job(api, healthy["id"])["status"] == "succeeded"


@pytest.mark.slow
def test_a_model_that_allocates_without_bound_fails_with_out_of_memory(api, models):
    hog = submit(api, models, model="hog").json()
    job = wait_for_job(api, hog["id"], timeout=180)
    assert job["status"] == "failed", job
    assert job["error"]["type"] == "out_of_memory", job["error"]
    assert "memory" in job["error"]["message"]


@pytest.mark.slow
def test_killing_the_audit_process_fails_only_that_job(service, api, models):
    import os

    from audit_service.jobs.store import JobStore

    store = JobStore(f"sqlite:///{service.data_dir.resolve() / 'jobs.sqlite3'}")
    victim = api("POST", "/audit", files={"model": ("hang.pt", open(models["hang"], "rb"))},
                 data={"spec": json.dumps(tiny_spec())}).json()
    # the sandbox has reported its first stage ("loading model"): the audit is under way, not being launched
    pid = wait_for(lambda: (row := store.get(victim["id"])).status == "running" and row.stage != "starting"
                   and row.sandbox_pid, 120, 0.2, "the audit to be under way in its sandbox")
    os.kill(pid, signal.SIGKILL)
    job = wait_for_job(api, victim["id"], timeout=60)
    assert job["status"] == "failed" and job["error"]["type"] == "killed"
    assert "SIGKILL" in job["error"]["message"]
    after = submit(api, models, model="plain2", params={"wait": 120})
    assert after.status_code == 200
