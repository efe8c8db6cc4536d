"""Bearer tokens and tenants on a real service: 401 without a valid token, another tenant's audit is a
404, listings show one's own, per-tenant limits answer 429 + Retry-After, retraining shared reference
runs is 403 for non-admin tenants, and ``serve`` refuses a non-loopback bind without tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import requests

from conftest import ROOT, Service, free_port, tiny_spec

pytestmark = pytest.mark.slow

ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    data = tmp_path_factory.mktemp("secured") / "data"
    tokens = tmp_path_factory.mktemp("secrets") / "tokens"
    tokens.write_text(f"# token:tenant\n{BOB}:bob\n")
    # web only (no audit workers): accepted jobs stay queued, which is what the limits need
    svc = Service(data, workers=0, web_workers=1, AUDIT_TOKENS=f"{ALICE}:alice", AUDIT_TOKENS_FILE=str(tokens),
                  AUDIT_MAX_TENANT_JOBS=2, AUDIT_ADMIN_TENANTS="alice").start()
    yield svc
    svc.stop()


def call(svc, contract, method, path, token=None, **kw):
    headers = kw.pop("headers", {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return contract(requests.request(method, svc.url + path, headers=headers, timeout=120, **kw))


def post_audit(svc, contract, models, token, seed=0):
    spec = tiny_spec(options={**tiny_spec()["options"], "seed": seed})
    return call(svc, contract, "POST", "/audit", token, files={"model": ("m.onnx", open(models["plain"], "rb"))},
                data={"spec": json.dumps(spec)})


def test_tokens_are_required_except_for_health(secured, contract):
    assert call(secured, contract, "GET", "/healthz").status_code == 200
    assert call(secured, contract, "GET", "/readyz").status_code == 200
    assert call(secured, contract, "GET", "/openapi.yaml").status_code == 200
    for path in ("/audits", "/audits/x", "/groups", "/metrics"):
        r = call(secured, contract, "GET", path)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert r.headers["Content-Type"] == "application/problem+json" and "Authorization" in r.json()["detail"]
    bad = call(secured, contract, "GET", "/audits", "not-a-token-but-long-enough")
    assert bad.status_code == 401 and "invalid_token" in bad.headers["WWW-Authenticate"]
    assert call(secured, contract, "GET", "/audits", headers={"Authorization": f"Basic {ALICE}"}).status_code == 401
    assert call(secured, contract, "GET", "/audits", ALICE).status_code == 200
    assert call(secured, contract, "GET", "/audits", BOB).status_code == 200  # from the tokens file


def test_front_door_pages_are_public_and_ask_for_a_token(secured, contract):
    page = call(secured, contract, "GET", "/")
    assert page.status_code == 200 and 'id="token"' in page.text  # the page holds no data; its script sends the token
    docs = call(secured, contract, "GET", "/docs")
    assert docs.status_code == 200
    assert call(secured, contract, "GET", "/docs/static/swagger-ui-bundle.js").status_code == 200
    assert call(secured, contract, "GET", "/audits").status_code == 401  # the data still needs a token


def test_tenants_see_only_their_own_audits_and_have_their_own_limits(secured, contract, models):
    first = post_audit(secured, contract, models, ALICE, seed=1)
    assert first.status_code == 202, first.text
    job_id = first.json()["id"]
    assert call(secured, contract, "GET", f"/audits/{job_id}", ALICE).json()["id"] == job_id
    for method, path in (("GET", f"/audits/{job_id}"), ("GET", f"/audits/{job_id}/report"),
                         ("GET", f"/audits/{job_id}/report.html"), ("GET", f"/audits/{job_id}/symmetrized.onnx"),
                         ("DELETE", f"/audits/{job_id}")):
        r = call(secured, contract, method, path, BOB)
        assert r.status_code == 404, (method, path, r.status_code)
        unknown = call(secured, contract, method, path.replace(job_id, "0" * 32), BOB).json()["detail"]
        assert r.json()["detail"] == unknown.replace("0" * 32, job_id)  # indistinguishable from an unknown id
    assert call(secured, contract, "GET", f"/audits/{job_id}/symmetrized.onnx", ALICE).status_code == 409  # queued
    assert call(secured, contract, "GET", "/audits", BOB).json()["total"] == 0
    assert [j["id"] for j in call(secured, contract, "GET", "/audits", ALICE).json()["items"]] == [job_id]

    assert post_audit(secured, contract, models, ALICE, seed=2).status_code == 202
    full = post_audit(secured, contract, models, ALICE, seed=3)  # limit 2 queued + running per tenant
    assert full.status_code == 429, full.text
    assert int(full.headers["Retry-After"]) >= 1
    problem = full.json()
    assert problem["type"].endswith("/tenant-limit") and "AUDIT_MAX_TENANT_JOBS=2" in problem["detail"]
    assert post_audit(secured, contract, models, BOB, seed=3).status_code == 202  # bob's own budget
    # cancelling frees a slot
    assert call(secured, contract, "DELETE", f"/audits/{job_id}", ALICE).status_code == 202
    assert post_audit(secured, contract, models, ALICE, seed=4).status_code == 202


def test_retraining_reference_runs_needs_an_admin_tenant(secured, contract):
    cards = call(secured, contract, "GET", "/references", BOB)
    if cards.status_code != 200 or not cards.json()["items"]:
        pytest.skip("no reference runs in this installation")
    name = cards.json()["items"][0]["name"]
    r = call(secured, contract, "POST", f"/references/{name}/runs", BOB, json={"epochs": 1})
    assert r.status_code == 403 and "AUDIT_ADMIN_TENANTS" in r.json()["detail"]


def test_serve_refuses_a_public_bind_without_tokens(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIT_")}
    env.update(AUDIT_DATA_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "audit_service.cli", "serve", "--host", "0.0.0.0", "--port",
                        str(free_port())], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "refusing to serve on '0.0.0.0' without authentication" in r.stderr and "AUDIT_TOKENS" in r.stderr


def test_token_configuration_is_checked(tmp_path):
    from audit_service.jobs.settings import Settings
    from audit_service.service.auth import TokenConfigError, check_bind, load_tokens, parse_tokens

    assert parse_tokens(f"{ALICE}:alice, {BOB}:bob", "x") == {ALICE: "alice", BOB: "bob"}
    for bad, why in (("short:alice", "at least 16"), (f"{ALICE}", "no `:tenant`"), (f"{ALICE}:bad tenant!", "tenant"),
                     (f"{ALICE}:a,{ALICE}:b", "once")):
        with pytest.raises(TokenConfigError, match=why):
            parse_tokens(bad, "AUDIT_TOKENS")
    assert check_bind("127.0.0.1", Settings()) is None and check_bind("::1", Settings()) is None
    assert "refusing" in check_bind("0.0.0.0", Settings())
    assert check_bind("0.0.0.0", Settings(tokens=f"{ALICE}:alice")) is None
    missing = Settings(tokens_file=str(tmp_path / "nope"))
    assert "AUDIT_TOKENS_FILE" in check_bind("127.0.0.1", missing)
    with pytest.raises(TokenConfigError):
        load_tokens(missing)


def test_store_limits_are_atomic_under_concurrency(tmp_path):
    """Many threads submitting at once for one tenant never exceed its limit (BEGIN IMMEDIATE)."""
    import threading

    from audit_service.jobs import JobKind, JobStore
    from audit_service.jobs.store import TenantLimit

    store = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    store.init_schema()
    accepted, refused = [], []

    def submit() -> None:
        try:
            store.create(kind=JobKind.AUDIT, spec={}, inputs={}, timeout_s=1, max_attempts=1, tenant="t",
                         max_tenant_jobs=5)
            accepted.append(1)
        except TenantLimit:
            refused.append(1)

    threads = [threading.Thread(target=submit) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(accepted) == 5 and len(refused) == 19


def test_an_open_service_refuses_rebinding_and_cross_site_changes(service, models):
    """Issue 19: without tokens, only loopback Host names are answered (a DNS-rebound page names its own host)
    and a browser's cross-site or other-origin POST changes nothing; clients without those headers, and the
    service's own pages (same-origin), go on working."""
    url = service.url
    rebound = requests.get(url + "/audits", headers={"Host": "attacker.example:8000"}, timeout=10)
    assert rebound.status_code == 403 and "loopback Host" in rebound.json()["detail"], rebound.text
    for host in ("localhost", "127.0.0.1:1", "[::1]:8000"):
        assert requests.get(url + "/audits", headers={"Host": host}, timeout=10).status_code == 200, host

    spec = json.dumps(tiny_spec())
    def post(**headers: str) -> requests.Response:
        return requests.post(url + "/audit", files={"model": ("m.onnx", models["plain"].read_bytes())},
                             data={"spec": spec}, headers=headers, timeout=120)

    for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                    {"Origin": "http://attacker.example"}, {"Origin": "null"}):
        r = post(**headers)
        assert r.status_code == 403 and "other web sites" in r.json()["detail"], (headers, r.text)
    before = requests.get(url + "/audits?limit=100", timeout=10).json()["total"]
    assert post(**{"Sec-Fetch-Site": "same-origin", "Origin": url}).status_code in (200, 202)
    assert post().status_code in (200, 202)  # curl, the CLI, Python clients
    assert requests.get(url + "/audits?limit=100", timeout=10).json()["total"] == before + 2
