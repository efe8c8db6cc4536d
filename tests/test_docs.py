"""The docs say what the code does (issue 23): the policy tag docs/mlflow.md shows is the one the MLflow
write-back writes, and its local-server recipe uses the flags the tests' own server starts with."""

from __future__ import annotations

import json
import re

from conftest import ROOT

MLFLOW_DOC = ROOT / "docs" / "mlflow.md"


def test_mlflow_doc_shows_the_current_policy_tag():
    from audit_service.adapters.mlflow_registry import verdict_tags
    from audit_service.engine.spec import Policy

    policy = Policy()
    tags = re.findall(r"`invariance\.policy` \(`([^`]+)`\)", MLFLOW_DOC.read_text())
    assert tags, "docs/mlflow.md names no invariance.policy tag"
    expected = f"{policy.name}@{policy.version}"
    assert set(tags) == {expected}, (tags, expected)
    # and it is what the write-back writes for a report of this policy
    report = json.loads((ROOT / "audit_service" / "reference" / "runs" / "R4_DA_s0" / "report.json").read_text())
    report["verdict"]["policy"] = policy.model_dump(mode="json")
    assert verdict_tags(report)["invariance.policy"] == expected


def test_mlflow_doc_starts_a_local_server_as_the_tests_do():
    text = MLFLOW_DOC.read_text()
    recipe = re.search(r"## A small local MLflow server.*?```bash\n(.*?)```", text, re.S)
    assert recipe, "docs/mlflow.md has no local-server recipe"
    commands = recipe.group(1)
    assert ".venv/bin/mlflow server" in commands and "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in commands
    for flag in ("--backend-store-uri sqlite:", "--artifacts-destination", "--workers 1"):
        assert flag in commands, flag
    server_test = (ROOT / "tests" / "test_mlflow.py").read_text()
    for flag in ("--backend-store-uri", "--artifacts-destination", "--workers", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"):
        assert flag in server_test, flag
    assert "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in commands
