"""Audit cost (issue 10): saliency only where it can change the verdict, early stopping, batched IG,
and the CUDA-only paths (bf16 autocast checked against fp32, IG batches sized to the device's memory)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audit_service.engine.schema import parse_report
from audit_service.engine.audit import AuditRequest, run_audit
from audit_service.engine.plan import AUTOCAST_TOLERANCE
from audit_service.engine.metrics.saliency import cuda_batch_limit, integrated_gradients
from audit_service.engine.spec import parse_audit_spec
from builders import IMAGE_SHAPE, MLP, OrbitAveragedCNN, PlainCNN, export_torchscript

TINY = {"n_probes": 12, "n_noise_probes": 8, "ig_steps": 4, "jacobian_probes": 4, "bootstrap": 0}
SHIFTS = [{"name": "gaussian_noise", "severity": 3}, {"name": "blur", "severity": 1}]
FORWARD = ("DI", "LI", "LI_normalized", "agreement", "accuracy")


def spec(group="C4", **options):
    return parse_audit_spec({"group": group, "shifts": SHIFTS, "options": {**TINY, **options}})


def probes(n: int = 12) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, *IMAGE_SHAPE)).astype(np.float32)


def by_name(report: dict) -> dict:
    return {c["name"]: c for c in report["conditions"]}


@pytest.fixture(scope="module")
def not_genuine(tmp_path_factory):
    """A random MLP: its logits move on the C4 orbit, so genuine fails on the forward metrics already."""
    return export_torchscript(MLP(in_features=144, n_classes=5, hidden=32, seed=3), IMAGE_SHAPE,
                              tmp_path_factory.mktemp("cost") / "mlp.pt")


def test_decisive_computes_si_on_clean_and_noise_only_when_genuine_already_fails(not_genuine):
    x = probes()
    decisive = run_audit(AuditRequest(not_genuine, spec(), x))
    everywhere = run_audit(AuditRequest(not_genuine, spec(saliency_scope="all"), x))
    assert decisive["verdict"]["label"] == everywhere["verdict"]["label"] != "genuine"
    assert decisive["spec"]["options"]["saliency_scope"] == "decisive"          # the default
    assert decisive["saliency"]["computed_on"] == ["clean", "noise"]
    assert everywhere["saliency"]["computed_on"] == ["clean", *(c["name"] for c in everywhere["conditions"][1:-1]),
                                                     "noise"]
    d, a = by_name(decisive), by_name(everywhere)
    assert list(d) == list(a)                                                    # report order unchanged
    for name in d:
        for metric in FORWARD:
            assert d[name]["metrics"][metric] == a[name]["metrics"][metric], (name, metric)
    for name in ("clean", "noise"):
        assert d[name]["saliency_computed"] and d[name]["metrics"]["SI"] == a[name]["metrics"]["SI"]
        assert d[name]["saliency_skipped"] is None
    for name in ("gaussian_noise@3", "blur@1"):
        assert not d[name]["saliency_computed"] and d[name]["metrics"]["SI"] is None
        assert "cannot change the verdict" in d[name]["saliency_skipped"]
        assert any("saliency_scope = decisive" in n for n in d[name]["notes"])
        assert a[name]["saliency_computed"] and a[name]["metrics"]["SI"] is not None
    assert decisive["timing"]["saliency_s"]["blur@1"] == 0.0
    assert decisive["early_stop"]["stopped"] is False and not decisive["early_stop"]["conditions_skipped"]


def test_decisive_computes_si_everywhere_when_it_decides(tmp_path):
    model = OrbitAveragedCNN(PlainCNN(n_classes=5, seed=1), group="C4")
    path = export_torchscript(model, IMAGE_SHAPE, tmp_path / "avg.pt")
    x = probes()
    decisive = run_audit(AuditRequest(path, spec(), x))
    everywhere = run_audit(AuditRequest(path, spec(saliency_scope="all"), x))
    assert decisive["verdict"]["label"] == everywhere["verdict"]["label"]
    assert decisive["saliency"]["computed_on"] == everywhere["saliency"]["computed_on"]
    assert "SI decides" in decisive["saliency"]["reason"]
    d, a = by_name(decisive), by_name(everywhere)
    for name in d:
        assert d[name]["saliency_computed"]
        assert d[name]["metrics"]["SI"] == pytest.approx(a[name]["metrics"]["SI"], abs=1e-9)
        assert d[name]["metrics"]["LI"] == a[name]["metrics"]["LI"]
    assert [e["similarity"] for e in decisive["saliency_examples"]] == \
        [e["similarity"] for e in everywhere["saliency_examples"]]


def test_scope_none_computes_no_saliency_and_says_why(not_genuine):
    report = run_audit(AuditRequest(not_genuine, spec(saliency_scope="none"), probes()))
    assert report["saliency"]["computed_on"] == [] and "saliency_scope = none" in report["saliency"]["reason"]
    for c in report["conditions"]:
        assert not c["saliency_computed"] and c["metrics"]["SI"] is None
        assert "saliency_scope = none" in c["saliency_skipped"]
    assert report["saliency_examples"] == []


def test_early_stop_skips_what_only_fills_the_report(not_genuine):
    x = probes()
    full = run_audit(AuditRequest(not_genuine, spec(), x))
    stopped = run_audit(AuditRequest(not_genuine, spec(early_stop=True), x))
    assert stopped["verdict"]["label"] == full["verdict"]["label"]
    assert [c["name"] for c in stopped["conditions"]] == ["clean", "noise"]
    info = stopped["early_stop"]
    assert info["stopped"] and info["sensitivity_skipped"]
    assert [c["name"] for c in info["conditions_skipped"]] == ["gaussian_noise@3", "blur@1"]
    assert "settled by clean and noise" in info["reason"]
    assert stopped["sensitivity"]["sigma_max"] is None and "early_stop" in stopped["sensitivity"]["note"]
    for name in ("clean", "noise"):
        assert by_name(stopped)[name]["metrics"] == by_name(full)[name]["metrics"]


def test_early_stop_does_not_stop_a_genuine_model(tmp_path):
    model = OrbitAveragedCNN(PlainCNN(n_classes=5, seed=1), group="C4")
    path = export_torchscript(model, IMAGE_SHAPE, tmp_path / "avg.pt")
    report = run_audit(AuditRequest(path, spec(early_stop=True), probes()))
    assert report["verdict"]["label"] == "genuine" and not report["early_stop"]["stopped"]
    assert len(report["conditions"]) == 4 and report["sensitivity"]["sigma_max"] is not None


def test_integrated_gradients_in_pieces_equal_one_batch():
    module = PlainCNN(n_classes=5, seed=2).eval()
    x = torch.randn(10, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(0))
    target = torch.arange(10) % 5
    whole = integrated_gradients(module, 8, 1024).attribute(x, target)
    pieces = integrated_gradients(module, 8, 3).attribute(x, target)
    torch.testing.assert_close(pieces, whole, rtol=1e-4, atol=1e-6)


def test_autocast_on_cpu_runs_fp32_and_says_so(not_genuine):
    report = run_audit(AuditRequest(not_genuine, spec(autocast_bf16=True, saliency_scope="none"), probes()))
    assert report["model"]["autocast"]["used"] is False and "needs CUDA" in report["model"]["autocast"]["note"]


# ----------------------------------------------------------------------------- CUDA only
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_bf16_autocast_metrics_match_fp32_within_tolerance(not_genuine):
    x = probes()
    fp32 = run_audit(AuditRequest(not_genuine, spec(device="cuda", saliency_scope="none"), x))
    bf16 = run_audit(AuditRequest(not_genuine, spec(device="cuda", saliency_scope="none", autocast_bf16=True), x))
    assert bf16["model"]["autocast"]["used"], bf16["model"]["autocast"]
    assert bf16["model"]["autocast"]["max_relative_logit_error"] <= AUTOCAST_TOLERANCE
    assert bf16["verdict"]["label"] == fp32["verdict"]["label"]
    for name, c in by_name(fp32).items():
        other = by_name(bf16)[name]["metrics"]
        assert other["agreement"] == pytest.approx(c["metrics"]["agreement"], abs=0.05)
        assert other["LI_normalized"] == pytest.approx(c["metrics"]["LI_normalized"], rel=0.1, abs=1e-3)


@cuda
def test_ig_batch_is_sized_to_the_free_device_memory():
    module = PlainCNN(n_classes=5, seed=2).eval().cuda()
    x = torch.randn(16, *IMAGE_SHAPE, device="cuda")
    limit = cuda_batch_limit(module, x)
    free, _ = torch.cuda.mem_get_info()
    assert 1 <= limit and limit * 1024 < free  # far above a sample's few KB, far below all of the memory
    whole = integrated_gradients(module.cpu(), 8, 1024).attribute(x.cpu(), torch.zeros(16, dtype=torch.long))
    on_gpu = integrated_gradients(module.cuda(), 8, 1024).attribute(x, torch.zeros(16, dtype=torch.long, device="cuda"))
    torch.testing.assert_close(on_gpu.cpu(), whole, rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- issue 21: sequential SI, IG nodes
SEQUENTIAL = {"n_probes": 48, "n_noise_probes": 16}


def test_sequential_si_stops_a_genuine_model_after_its_first_batch(tmp_path):
    model = OrbitAveragedCNN(PlainCNN(n_classes=5, seed=1), group="C4")
    path = export_torchscript(model, IMAGE_SHAPE, tmp_path / "avg.pt")
    x = probes(48)
    sequential = run_audit(AuditRequest(path, spec(**SEQUENTIAL), x))
    everywhere = run_audit(AuditRequest(path, spec(saliency_scope="all", **SEQUENTIAL), x))
    assert sequential["verdict"]["label"] == everywhere["verdict"]["label"] == "genuine"
    assert not sequential["verdict"]["borderline"]
    for c in sequential["conditions"]:
        sampling = c["saliency_sampling"]
        assert sampling["stopped"] == "decided", (c["name"], sampling)
        assert sampling["probes_used"] == 16 and sampling["probes_cap"] == c["n_probes"]
        assert sampling["interval"][0] >= 0.98 and sampling["confidence"] == 0.95
        assert c["spread"]["SI"]["n"] == 16 and c["n_probes"] == (16 if c["name"] == "noise" else 48)
        assert c["metrics"]["SI"] == pytest.approx(1.0, abs=1e-6)
    for c in everywhere["conditions"]:
        assert c["saliency_sampling"]["stopped"] == "cap" and c["saliency_sampling"]["probes_used"] == c["n_probes"]
    # the saving is counted, not timed (a wall-clock comparison of two sub-second passes is noise): SI's
    # saliency pass ran on a third of the clean probes, and the everywhere run on all of them
    assert sequential["conditions"][0]["spread"]["SI"]["n"] * 3 == everywhere["conditions"][0]["spread"]["SI"]["n"]
    typed = parse_report(sequential, strict=True)  # the typed report models the key, name for name
    assert typed.conditions[0].saliency_sampling.stopped == "decided"


def test_sequential_si_needs_one_batch_when_genuine_already_fails(not_genuine):
    x = probes(48)
    sequential = run_audit(AuditRequest(not_genuine, spec(**SEQUENTIAL), x))
    everywhere = run_audit(AuditRequest(not_genuine, spec(saliency_scope="all", **SEQUENTIAL), x))
    assert sequential["verdict"]["label"] == everywhere["verdict"]["label"] != "genuine"
    assert sequential["verdict"]["borderline"] == everywhere["verdict"]["borderline"]
    d = by_name(sequential)
    for name in ("clean", "noise"):
        sampling = d[name]["saliency_sampling"]
        assert sampling["stopped"] == "not_needed" and sampling["probes_used"] == 16, sampling
        lo, hi = sampling["interval"]
        assert lo <= d[name]["metrics"]["SI"] <= hi
    for name in ("gaussian_noise@3", "blur@1"):
        assert "saliency_sampling" not in d[name] and d[name]["metrics"]["SI"] is None
        for metric in FORWARD:  # the forward metrics always use every probe
            assert d[name]["metrics"][metric] == by_name(everywhere)[name]["metrics"][metric]


def test_si_bound_holds_the_verdicts_interval_and_decides_either_side():
    from audit_service.engine.metrics import summarize
    from audit_service.engine.sequential import decided, si_bound

    assert si_bound(np.array([np.nan, np.nan]), 0.95, 4, 200, 0) is None
    assert si_bound(np.ones(16), 0.95, 4, 200, 0) == (1.0, 1.0)
    assert decided((1.0, 1.0), 0.98) and decided((0.5, 0.9), 0.98) and not decided((0.97, 0.99), 0.98)
    values = np.random.default_rng(0).normal(0.97, 0.05, size=16)
    lo, hi = si_bound(values, 0.95, 4, 200, 0)
    ci = summarize(values, 200, 0)["ci95"]
    assert lo <= ci[0] and hi >= ci[1]                                 # never narrower than what the verdict reads
    z = 2.4977                                                         # 95% over 4 looks, Bonferroni
    se = values.std(ddof=1) / np.sqrt(values.size)
    assert hi - lo >= 2 * z * se - 1e-9 and not decided((lo, hi), 0.98)


def test_plan_is_decided_once_from_the_spec():
    from audit_service.engine.metrics.saliency import occlusion
    from audit_service.engine.plan import make_plan

    method = occlusion(lambda t: t.flatten(1), IMAGE_SHAPE, "no gradients in this test")
    plan = make_plan(spec(), method)
    assert plan.scope == "decisive" and plan.sequential and plan.si_threshold == 0.98 and not plan.autocast
    assert [plan.si_batch(n) for n in (12, 32, 64, 256)] == [12, 16, 16, 64]
    assert plan.looks(64) == 4 and plan.looks(12) == 1
    assert make_plan(spec(saliency_scope="all"), method).si_batch(64) == 64
    assert make_plan(spec(), None).scope == "none" and make_plan(spec(saliency=False), method).scope == "none"
    with pytest.raises(AttributeError):
        plan.scope = "all"                                             # a value, not a switch


def test_ig_nodes_are_chosen_by_the_completeness_error():
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 5)).eval()
    x = torch.randn(20, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(0))
    target = torch.arange(20) % 5
    method = integrated_gradients(linear, 16, 1024, adaptive=True)
    attr = method.attribute(x, target)
    assert method.ig.steps == 4 and method.ig.tried[0][0] == 4       # IG of a linear model is exact at any count
    error, scale = method.ig.completeness(x, target, attr)
    assert scale > 0 and error / scale < 1e-5
    assert "n_steps=4" in method.describe() and "gausslegendre" in method.describe()

    relu = PlainCNN(n_classes=5, seed=2).eval()
    strict = integrated_gradients(relu, 16, 1024, adaptive=True, tolerance=1e-9)
    strict.attribute(x, target)
    assert strict.ig.steps == 16 and [s for s, _ in strict.ig.tried] == [4, 8, 16]   # never past the cap
    errors = [e for _, e in strict.ig.tried]
    assert errors[-1] < errors[0]                                     # more nodes integrate better
    fixed = integrated_gradients(relu, 8, 1024)
    torch.testing.assert_close(fixed.attribute(x, target),
                               integrated_gradients(relu, 8, 1024, adaptive=True, tolerance=1.0).ig._attribute(
                                   x, target, 8))
