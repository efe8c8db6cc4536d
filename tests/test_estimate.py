"""``jobs/estimate.py`` (issue 23, cost before work): the count of an audit's passes follows the sweep, the
refusal names the field to change, and the timing of a real model is positive and small for a small model."""

from __future__ import annotations

import pytest

from audit_service.engine.spec import parse_audit_spec
from audit_service.jobs.estimate import Estimate, count_samples, estimate, format_seconds, refusal


def spec(**options):
    return parse_audit_spec({"group": "C4", "options": {"n_probes": 64, "n_noise_probes": 32, "ig_steps": 16,
                                                         "probe_chunk": 64, **options}})


# decisive: sequential SI may stop after its first batch (max(16, cap / 4) probes) on the fewest Gauss-Legendre
# nodes (4); the estimate counts only that much, so it leans low. all: every probe on ig_steps nodes.
@pytest.mark.parametrize("scope, with_saliency, nodes", [("decisive", 16 + 16, 4), ("all", 64 * 10 + 32, 16),
                                                         ("none", 0, 0)])
def test_count_follows_the_sweep(scope, with_saliency, nodes):
    conditions, forward, gradient, chunks = count_samples(spec(saliency_scope=scope), 4, n_probes=64, n_shifts=9)
    assert conditions == 11                                   # clean, 9 shifts, noise
    assert forward == 4 * (64 * 10 + 32)                      # every probe through the whole group, once
    assert gradient == 4 * with_saliency * (nodes + 1)        # nodes + 1 a sample where SI is computed
    assert chunks == 11


def test_without_probes_only_noise_is_swept():
    conditions, forward, gradient, chunks = count_samples(spec(), 360, n_probes=0, n_shifts=9)
    assert (conditions, forward, gradient, chunks) == (1, 360 * 32, 360 * 16 * 5, 1)
    assert count_samples(spec(saliency=False), 360, 0, 9)[2] == 0


def _estimate(seconds: float) -> dict:
    return Estimate(group_elements=360, conditions=11, forward_samples=10, gradient_samples=10, chunks=11,
                    sample_s=1e-4, gradient_sample_s=1e-3, call_s=1e-3, gradient_call_s=1e-2, batch=1024,
                    seconds=seconds, device="cpu").to_dict()


def test_refusal_names_the_field_to_change():
    entry = {"sha256": "x", "estimate": _estimate(100.0)}
    message, field = refusal({"options": {"n_probes": 64}}, entry, timeout_s=10, max_timeout_s=3600)
    assert field == "timeout_s" and "estimate" not in entry    # taken out: not stored with the job
    assert "raise `timeout_s` to at least 150" in message and "about 1.7 min" in message
    assert "a group of at most about 36 elements" in message    # 10 s of 100 s: a tenth of the 360
    message, field = refusal({}, {"estimate": _estimate(7200.0)}, timeout_s=3600, max_timeout_s=3600)
    assert field == "spec.group" and "the service's limit of 3600 s" in message
    assert refusal({}, {"estimate": _estimate(5.0)}, timeout_s=10, max_timeout_s=3600) is None
    assert refusal({"options": {"device": "cuda"}}, {"estimate": _estimate(1e6)}, 10, 3600) is None
    assert refusal({}, {"sha256": "x"}, 10, 3600) is None


def test_format_seconds():
    assert [format_seconds(s) for s in (0.5, 42, 450, 7560)] == ["0.5 s", "42 s", "7.5 min", "2.1 h"]


def test_a_real_small_model_is_timed(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from builders import IMAGE_SHAPE, PlainCNN, export_onnx

    from audit_service.engine.runtime import load_model

    runner = load_model(export_onnx(PlainCNN(), IMAGE_SHAPE, tmp_path / "m.onnx"), device="cpu")
    found = estimate(spec(), runner, n_probes=64, n_shifts=9, group_elements=4)
    assert found.forward_samples == 4 * (64 * 10 + 32) and found.batch == 256
    assert 0 < found.seconds < 60, found.describe()           # a 12x12 CNN: seconds, not minutes
    assert found.call_s > 0 and found.gradient_call_s > 0
