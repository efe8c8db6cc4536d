"""The Python API on what users hold: a stock torchvision ResNet-18 in memory, its ONNX export, bytes;
``symmetrize`` (audited genuine, exported to ONNX and audited again through the CLI); the training
faces (``logit_invariance_loss`` equals the audit's LI; ``OrbitInvariance`` streams to the one-shot value)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torchvision

from audit_service import AuditResult, OrbitInvariance, audit, build_group, logit_invariance_loss, symmetrize
from conftest import ROOT

SHAPE = (3, 32, 32)
#: tiny audits; integrated gradients (ig_steps backward passes of a ResNet-18) are most of this file's cost
OPTS = {"n_probes": 8, "n_noise_probes": 8, "ig_steps": 2, "jacobian_probes": 2, "bootstrap": 20}


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    with torch.no_grad():  # spread the logits so the metrics are well above round-off
        model.fc.weight.mul_(20.0)
    return model.train()  # as a training loop holds it: the audit must not leave it in eval mode


@pytest.fixture(scope="module")
def probes():
    return torch.rand(8, *SHAPE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def onnx_file(resnet, probes, tmp_path_factory):
    path = tmp_path_factory.mktemp("api") / "resnet18.onnx"
    resnet.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(resnet, (probes[:2],), str(path), input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, dynamo=False)
    resnet.train()
    return path


def test_an_in_memory_module_audits_like_its_onnx_export(resnet, probes, onnx_file):
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    in_memory = audit(resnet, "flip", probes, shifts=[], **OPTS)
    from_file = audit(onnx_file, "flip", probes.numpy(), shifts=[], **OPTS)
    from_bytes = audit(onnx_file.read_bytes(), {"name": "flip"}, probes, shifts=[], **OPTS)
    assert isinstance(in_memory, AuditResult) and in_memory.model["format"] == "module"
    # the sections read through to the typed report; on the class they are the descriptors (help(), autospec)
    assert in_memory.verdict is in_memory.report.verdict and hasattr(AuditResult, "verdict")
    assert in_memory.label == from_file.label == from_bytes.label
    for metric in ("LI", "LI_normalized", "DI", "agreement"):
        a, b = in_memory.condition("clean").metrics[metric], from_file.condition("clean").metrics[metric]
        assert a == pytest.approx(b, rel=1e-3, abs=1e-6), metric
    assert from_bytes.condition("clean").metrics == from_file.condition("clean").metrics
    assert in_memory.to_json()["verdict"]["label"] == in_memory.label and "<html" in in_memory.to_html()
    assert resnet.training and all(m.training for m in resnet.modules())  # its mode is given back
    assert all(torch.equal(before[k], v) for k, v in resnet.state_dict().items())  # weights untouched
    assert all(p.requires_grad for p in resnet.parameters())  # not frozen: the caller may go on training it


@pytest.mark.slow  # 12 CPU s; the fast lane symmetrizes in test_symmetrize_formats and test_every_api_function_...
def test_symmetrize_is_genuine_in_memory_and_as_onnx(resnet, probes, tmp_path, onnx_file):
    """A trained digit CNN (the shipped demo, through its onnx2torch twin) symmetrized in memory audits
    genuine under the default shifts; the stock ResNet-18 symmetrized by the CLI is exactly invariant
    as ONNX and computes what the torch module computes."""
    from audit_service.engine.runtime import load_model

    demo = np.load(ROOT / "models" / "demo" / "probes.npz")
    twin = load_model(ROOT / "models" / "demo" / "plain_cnn.onnx", device="cpu").torch_module()
    digits = demo["x"][:16]
    fixed = symmetrize(twin, "C4", input_shape=digits.shape[1:]).eval()
    result = audit(fixed, "C4", digits, demo["y"][:16], **{**OPTS, "n_probes": 16})
    assert result.label == "genuine", result.verdict.reasons

    out = tmp_path / "fixed.onnx"
    cli = subprocess.run([sys.executable, "-m", "audit_service.cli", "symmetrize", str(onnx_file), "--group", "C4",
                          "-o", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr
    assert "4 forward passes" in cli.stdout
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: probes.numpy()})[0]
    rotated = session.run(None, {name: torch.rot90(probes, 1, (2, 3)).contiguous().numpy()})[0]
    np.testing.assert_allclose(rotated, logits, rtol=1e-4, atol=1e-4 * np.abs(logits).max())
    resnet.eval()
    with torch.no_grad():
        torch_logits = symmetrize(resnet, build_group("C4", SHAPE))(probes).numpy()
    resnet.train()
    np.testing.assert_allclose(logits, torch_logits, rtol=1e-3, atol=1e-3 * np.abs(logits).max())


def test_a_model_that_is_not_genuine_is_offered_its_symmetrization(resnet, probes):
    labels = torch.arange(8) % 10
    result = audit(resnet, "C4", probes, labels, shifts=[], **OPTS)
    assert result.label != "genuine"
    offer = result.to_json()["symmetrized"]
    assert offer["available"] and offer["forward_passes_per_sample"] == 4
    assert 0.0 <= offer["accuracy"] <= 1.0
    with torch.no_grad():  # what the report says the original gets right on the labeled probes
        resnet.eval()
        assert offer["accuracy_original"] == pytest.approx(float((resnet(probes).argmax(-1) == labels).float().mean()))
    resnet.train()


def test_the_regularizer_is_the_audits_logit_error_and_it_trains(resnet, probes):
    group = build_group("flip", SHAPE)
    resnet.eval()
    loss = logit_invariance_loss(resnet, probes, group)
    # the paper's regularizer averages over all of G, identity included: the report's paper_metrics (its
    # metrics leave the identity out, so for flip they are twice as large)
    clean = next(c for c in audit(resnet, "flip", probes, shifts=[], **OPTS).to_json()["conditions"]
                 if c["name"] == "clean")
    reported = clean["paper_metrics"]["LI"]
    assert clean["metrics"]["LI"] == pytest.approx(2 * reported, rel=1e-6)
    assert float(loss.detach()) == pytest.approx(reported, rel=1e-3)
    loss.backward()
    assert resnet.fc.weight.grad is not None and resnet.fc.weight.grad.abs().sum() > 0
    resnet.zero_grad()
    sym = symmetrize(resnet, group)
    assert float(logit_invariance_loss(sym, probes, group)) < 1e-8 * max(1.0, float(loss))
    resnet.train()


def test_the_streaming_metric_matches_one_pass(resnet, probes):
    group = build_group("flip", SHAPE)
    resnet.eval()
    metric = OrbitInvariance(group)
    metric.update(resnet, probes[:3])
    metric.update(resnet, probes[3:])
    streamed = metric.compute()
    metric.reset()
    metric.update(resnet, probes)
    once = metric.compute()
    assert streamed.n_pairs == once.n_pairs == 16
    assert streamed.LI == pytest.approx(once.LI, rel=1e-5) and streamed.DI == pytest.approx(once.DI, rel=1e-5)
    assert streamed.LI == pytest.approx(float(logit_invariance_loss(resnet, probes, group)), rel=1e-4)
    metric.reset()
    with pytest.raises(ValueError, match="update"):
        metric.compute()
    resnet.train()


@pytest.mark.slow  # a fresh interpreter audits a ResNet-18 with the default options: 10-16 CPU s
def test_the_readme_example_runs_as_pasted(tmp_path):
    import re

    code = re.search(r"## The Python API.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    first = out.stdout.splitlines()[0]
    assert first.startswith(("AuditResult(trivial", "AuditResult(not_invariant")) and "passed=False" in first, first
    assert (tmp_path / "report.html").stat().st_size > 10_000


GROUP_FORMS = {"name": "C4", "dict": {"name": "C4"}, "spec object": "spec", "built group": "built"}


def _group_form(form):
    from audit_service import C4Spec

    return C4Spec(name="C4") if form == "spec" else build_group("C4", SHAPE) if form == "built" else form


@pytest.mark.parametrize("kind", list(GROUP_FORMS))
def test_every_api_function_takes_every_group_form(kind, resnet, probes):
    """One group argument (``groups.resolve``): a name, a dict, a spec object or a built group give the same
    numbers in all four functions; the shape comes from the tensor in hand, or ``input_shape`` for symmetrize."""
    group, built = _group_form(GROUP_FORMS[kind]), build_group("C4", SHAPE)
    resnet.eval()
    try:
        with torch.no_grad():
            expected = float(logit_invariance_loss(resnet, probes, built))
            assert float(logit_invariance_loss(resnet, probes, group)) == pytest.approx(expected, rel=1e-6)
            metric = OrbitInvariance(group)
            metric.update(resnet, probes)
            assert metric.compute().LI == pytest.approx(expected, rel=1e-4)
            assert metric.group.order == 4 and metric.group.input_shape == SHAPE
            sym = symmetrize(resnet, group, input_shape=SHAPE)
            np.testing.assert_allclose(sym(probes).numpy(), symmetrize(resnet, built)(probes).numpy(), rtol=1e-5)
    finally:
        resnet.train()
    small = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 30 * 30, 3))
    torch.manual_seed(0)
    result = audit(small, group, probes, shifts=[], **{**OPTS, "saliency": False})
    assert result.to_json()["group"]["spec"] == {"name": "C4"} and result.to_json()["group"]["order"] == 4


def test_a_group_without_a_shape_says_what_to_pass(resnet, probes):
    from audit_service.engine.errors import SpecError

    with pytest.raises(SpecError, match=r"input_shape=\(C, H, W\)") as err:
        symmetrize(resnet, "C4")
    assert err.value.field == "input_shape"
    with pytest.raises(SpecError, match="built for 3x16x16") as err:
        logit_invariance_loss(resnet, probes, build_group("C4", (3, 16, 16)))
    assert err.value.field == "group"
    with pytest.raises(SpecError, match="built for 3x16x16"):
        audit(resnet, build_group("C4", (3, 16, 16)), probes, shifts=[], **OPTS)
    with pytest.raises(SpecError, match="a spec dict, a spec object"):
        OrbitInvariance(4).update(resnet, probes)
