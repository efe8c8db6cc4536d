"""Channels-last gradient passes (issue 10, "cheaper passes"): used where it helps, checked, undone.

The stock torchvision ResNet-18 is the model users bring; the ``.view`` model is the one that breaks in
channels-last and must fall back without failing the audit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from audit_service import audit as audit_api
from audit_service.engine.audit import AuditRequest, run_audit
from audit_service.engine.spec import parse_audit_spec
from builders import export_torchscript

SHAPE = (3, 32, 32)
OPTIONS = {"n_probes": 6, "n_noise_probes": 4, "ig_steps": 4, "jacobian_probes": 4, "bootstrap": 0,
           "saliency_scope": "all"}
METRICS = ("DI", "LI", "LI_normalized", "SI", "agreement")


def spec(memory_format: str, shape_shifts: list | None = None):
    return parse_audit_spec({"group": "flip", "shifts": shape_shifts or [{"name": "blur", "severity": 1}],
                             "options": {**OPTIONS, "memory_format": memory_format}})


def probes(shape=SHAPE, n: int = 6) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, *shape)).astype(np.float32)


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    with torch.no_grad():  # BatchNorm statistics of N(0, 1) inputs: several classes predicted, finite logits
        model(torch.randn(16, *SHAPE))
    return model.eval()


@pytest.fixture(scope="module")
def resnet_ts(tmp_path_factory):
    return export_torchscript(resnet18(), SHAPE, tmp_path_factory.mktemp("layout") / "resnet18.pt")


def test_auto_uses_channels_last_for_a_cpu_resnet_and_metrics_match_contiguous(resnet_ts):
    x = probes()
    fast = run_audit(AuditRequest(resnet_ts, spec("auto"), x))
    plain = run_audit(AuditRequest(resnet_ts, spec("contiguous"), x))
    assert fast["model"]["memory_format"]["used"] == "channels_last", fast["model"]["memory_format"]
    assert plain["model"]["memory_format"] == {"used": "contiguous", "reason": "options.memory_format = contiguous"}
    assert fast["verdict"]["label"] == plain["verdict"]["label"]
    for f, p in zip(fast["conditions"], plain["conditions"]):
        for metric in METRICS:
            a, b = f["metrics"][metric], p["metrics"][metric]
            assert (a is None) == (b is None), (f["name"], metric)
            if a is not None:
                assert a == pytest.approx(b, rel=1e-3, abs=1e-5), (f["name"], metric, a, b)


class ViewsItsActivations(nn.Module):
    """``.view`` of a convolution's output: fine in NCHW, an error once the weights are channels-last."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 32 * 32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return self.head(y.view(y.shape[0], -1))


def test_a_model_that_fails_in_channels_last_falls_back_and_the_audit_completes(tmp_path):
    path = export_torchscript(ViewsItsActivations().eval(), SHAPE, tmp_path / "view.pt", script=True)
    report = run_audit(AuditRequest(path, spec("channels_last"), probes()))
    layout = report["model"]["memory_format"]
    assert layout["used"] == "contiguous" and "failed in it" in layout["reason"], layout
    assert report["conditions"][0]["metrics"]["LI"] is not None


def test_auto_keeps_vectors_and_convolution_free_models_contiguous():
    vectors = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    result = audit_api(vectors, {"name": "translation", "order": 12, "axis": 0}, probes((12,)), shifts=[], **OPTIONS)
    assert result.model["memory_format"]["used"] == "contiguous"
    assert "not images" in result.model["memory_format"]["reason"]
    dense = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).eval()
    result = audit_api(dense, "C4", probes((3, 8, 8)), shifts=[], **OPTIONS)
    assert "no 4-D (convolution) weights" in result.model["memory_format"]["reason"]


def test_an_in_memory_module_comes_back_in_its_own_layout():
    model = resnet18()
    result = audit_api(model, "flip", probes(), shifts=[], memory_format="channels_last", **OPTIONS)
    assert result.model["memory_format"]["used"] == "channels_last"
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous() for p in convs)                  # converted for the audit, restored
