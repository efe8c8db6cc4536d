"""Cost before work (issue 23): the submission check times the model in the sandbox and refuses, with a 422
naming the field to change and the estimate, an audit that cannot finish within its ``timeout_s``; a normal
audit is accepted. Against the real running service (``api``: every answer checked against openapi.yaml)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from conftest import tiny_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def probes_256(tmp_path_factory) -> bytes:
    from builders import IMAGE_SHAPE

    path = tmp_path_factory.mktemp("estimate") / "probes.npy"
    np.save(path, np.random.default_rng(0).random((256, *IMAGE_SHAPE), dtype=np.float32))
    return path.read_bytes()


def _post(api, models, spec: dict, timeout_s: str, probes: bytes | None = None):
    files = {"model": ("plain.onnx", open(models["plain"], "rb"))}
    if probes is not None:
        files["probes"] = ("probes.npy", probes)
    return api("POST", "/audit", files=files, data={"spec": json.dumps(spec), "timeout_s": timeout_s,
                                                     "reuse": "false"})


def test_a_360_angle_rotation_that_cannot_finish_in_time_is_refused_with_the_estimate(api, models, probes_256):
    spec = {"group": {"name": "rotation", "n_angles": 360},
            "options": {"n_probes": 256, "ig_steps": 64, "saliency_scope": "all"}}
    r = _post(api, models, spec, "5", probes_256)
    assert r.status_code == 422, r.text
    problem = r.json()
    detail = problem["detail"]
    assert "timeout_s=5" in detail and "360 group elements" in detail, detail
    # the numbers: 360 x 256 probes x (clean + 9 default shifts) + 360 x 32 noise probes forward passes, and as
    # many samples x 65 IG steps of gradient passes (saliency on every condition)
    assert f"{360 * (256 * 10 + 32):,} forward passes" in detail, detail
    assert f"{360 * (256 * 10 + 32) * 65:,} gradient passes" in detail, detail
    assert "spec.group" in detail and "spec.options.n_probes" in detail
    # the field to change: timeout_s while the service's cap (300 s here) would do; the measured time a sample
    # is wall-clock, so on a crowded machine the estimate can pass the cap, and then the group is the field
    if problem["field"] == "timeout_s":
        assert re.search(r"raise `timeout_s` to at least \d+ \(the service allows up to 300 s\)", detail), detail
    else:
        assert problem["field"] == "spec.group" and "the service's limit of 300 s" in detail, detail
    # beyond the service's own limit (AUDIT_JOB_TIMEOUT_S=300 in the test service) the group is what to change
    huge = {**spec, "options": {"n_probes": 256, "n_noise_probes": 10_000, "ig_steps": 512, "saliency_scope": "all"}}
    r = _post(api, models, huge, "300", probes_256)
    assert r.status_code == 422 and r.json()["field"] == "spec.group", r.text
    assert "the service's limit of 300 s" in r.json()["detail"]


def test_a_normal_audit_is_accepted_within_the_same_small_timeout(api, models):
    r = _post(api, models, tiny_spec("C4"), "5")
    assert r.status_code == 202, r.text
    assert "estimate" not in r.json()["inputs"]["model"]   # the estimate is not stored with the job
