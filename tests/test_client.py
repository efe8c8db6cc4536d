"""``audit_service.adapters.client`` and ``audit-service submit`` against the running service: exit codes
0 (gate passed), 1 (gate failed), 2 (bad input / failed audit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, free_port, tiny_spec

pytestmark = pytest.mark.slow


def submit_cli(service, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "audit_service.cli", "submit", *args, "--url", service.url, "--quiet"],
                          capture_output=True, text=True, timeout=300, env=env)


def test_client_round_trip(service, models):
    from audit_service.adapters.client import AuditClient, ServiceError

    client = AuditClient(service.url)
    assert client.health() == {"status": "ok"}
    seen = []
    report = client.audit(models["plain"], tiny_spec(), probes=models["probes"], progress=seen.append)
    assert report["verdict"]["label"] and seen and seen[-1]["status"] == "succeeded"
    with pytest.raises(ServiceError) as err:
        client.submit(models["garbage"], tiny_spec())
    assert err.value.status == 422 and err.value.field == "model"


def test_submit_exit_codes(service, models, tmp_path):
    spec = json.dumps(tiny_spec())
    ok = submit_cli(service, str(models["invariant"]), "--spec", spec, "--require", "genuine",
                    "--report", str(tmp_path / "r.json"), "--html", str(tmp_path / "r.html"))
    assert ok.returncode == 0, ok.stderr + ok.stdout
    out = json.loads(ok.stdout)
    assert out["verdict"] == "genuine" and out["passed"] is True
    assert json.loads((tmp_path / "r.json").read_text())["verdict"]["label"] == "genuine"
    assert "Verdict" in (tmp_path / "r.html").read_text()

    gate = submit_cli(service, str(models["plain"]), "--group", "C4", "--shift", "none", "--spec", spec,
                      "--require", "genuine,learned")
    assert gate.returncode == 1, gate.stderr + gate.stdout
    assert json.loads(gate.stdout)["passed"] is False

    bad_model = submit_cli(service, str(models["garbage"]), "--group", "C4")
    assert bad_model.returncode == 2 and "model" in bad_model.stderr and "Traceback" not in bad_model.stderr
    bad_group = submit_cli(service, str(models["plain"]), "--group", "C5")
    assert bad_group.returncode == 2 and "spec.group" in bad_group.stderr
    missing = submit_cli(service, str(ROOT / "no-such-model.onnx"), "--group", "C4")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_submit_to_an_unreachable_service_is_exit_2(models):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "audit_service.cli", "submit", str(models["plain"]), "--group", "C4",
                        "--url", f"http://127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 2 and "could not reach" in r.stderr
