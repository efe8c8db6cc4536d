"""Model-zoo conformance: stock torchvision classifiers (random weights), each exported four ways.

ONNX through the legacy exporter (``dynamo=False``, Identity-shared initializers) and the dynamo
exporter (opset 18+, ``Reshape(allowzero=1)``, ``ReduceMean-18``, ``Gelu-20``), TorchScript and
``torch.export`` ``.pt2``. Each must load, get a differentiable torch module that reproduces the
reference logits within 1e-4, and audit with integrated gradients (never the gradient-free fallback).
Kept small for CI: 3x32x32 inputs, 4 probes, 2 IG steps, one export per model and format per module.
ResNet-18 as legacy ONNX runs in the fast lane; its other formats and the other architectures are marked slow.
"""

from __future__ import annotations

import json
import time
import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from audit_service.engine.audit import AuditRequest, run_audit
from audit_service.engine.runtime import load_model
from audit_service.engine.spec import parse_audit_spec

SHAPE = (3, 32, 32)
CLASSES = 10
TOLERANCE = 1e-4
EXPORTS = ("onnx-legacy", "onnx-dynamo", "torchscript", "pt2")
TINY = {"n_probes": 4, "n_noise_probes": 4, "ig_steps": 2, "jacobian_probes": 1, "bootstrap": 0,
        "device": "cpu", "probe_chunk": 4}

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning",
                                        "ignore::DeprecationWarning")


def _vit() -> nn.Module:
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=CLASSES)
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-initialises the head: constant logits
    return model


BUILDERS = {
    "resnet18": lambda: torchvision.models.resnet18(weights=None, num_classes=CLASSES),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=CLASSES),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(weights=None, num_classes=CLASSES),
    "vit_tiny": _vit,
    "regnet_y_400mf": lambda: torchvision.models.regnet_y_400mf(weights=None, num_classes=CLASSES),
}
SLOW = {"mobilenet_v3_small", "efficientnet_b0", "vit_tiny", "regnet_y_400mf"}


def export(model: nn.Module, how: str, path, programs: dict) -> None:
    """Write ``model`` in one of the four formats; the torch.export program is made once per model
    (the dynamo ONNX exporter accepts it, which saves a second trace)."""
    example = (torch.rand((2, *SHAPE), generator=torch.Generator().manual_seed(1)),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how in ("onnx-dynamo", "pt2") and "program" not in programs:
            programs["program"] = torch.export.export(model, example,
                                                      dynamic_shapes=({0: torch.export.Dim("batch")},))
        if how == "onnx-legacy":
            torch.onnx.export(model, example, str(path), dynamo=False, input_names=["x"], output_names=["logits"],
                              dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
        elif how == "onnx-dynamo":
            torch.onnx.export(programs["program"], example, str(path), dynamo=True, input_names=["x"],
                              output_names=["logits"], external_data=False, verbose=False)
        elif how == "torchscript":
            torch.jit.save(torch.jit.trace(model, example, check_trace=False), str(path),
                           _extra_files={"input_shape.json": json.dumps(list(SHAPE))})
        else:
            torch.export.save(programs["program"], str(path))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """name -> (eager model, {export: path}); each model is exported lazily, once per module."""
    cache: dict[str, tuple[nn.Module, dict, dict]] = {}

    def get(name: str, how: str):
        if name not in cache:
            cache.clear()  # one model in memory at a time
            torch.manual_seed(0)
            cache[name] = (BUILDERS[name]().eval(), {}, {})
        model, paths, programs = cache[name]
        if how not in paths:
            suffix = {"onnx-legacy": ".onnx", "onnx-dynamo": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}[how]
            path = tmp_path_factory.mktemp(name) / f"{how}{suffix}"
            export(model, how, path, programs)
            paths[how] = path
        return model, paths[how]

    return get


def probes(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).random((n, *SHAPE), dtype=np.float32)


CASES = [pytest.param(name, how, id=f"{name}-{how}",
                      marks=[pytest.mark.slow] if name in SLOW or how != "onnx-legacy" else [])
         for name in BUILDERS for how in EXPORTS]


@pytest.mark.parametrize("name, how", CASES)
def test_zoo_model_loads_matches_and_audits_with_integrated_gradients(zoo, name, how):
    model, path = zoo(name, how)
    runner = load_model(path, device="cpu")
    assert runner.input_shape == SHAPE and runner.num_classes == CLASSES
    module = runner.torch_module()
    assert module is not None, runner.gradient_note
    x = torch.from_numpy(probes(3))
    with torch.no_grad():
        reference = runner.logits(x)  # onnxruntime for ONNX, the program itself otherwise
        eager = model(x)
        twin = module(x)
    scale = max(1.0, float(reference.abs().max()))
    error = float((twin - reference).abs().max())
    assert error / scale <= TOLERANCE, error
    # random-weight MobileNet / EfficientNet logits are ~1e-10 / 1e-14: check the twin on their own scale too
    assert error <= TOLERANCE * float(reference.abs().max()), (error, float(reference.abs().max()))
    assert float((reference - eager).abs().max()) / scale <= TOLERANCE  # the export itself is faithful
    if runner.format == "onnx":
        assert runner.twin_error is not None and runner.twin_error <= TOLERANCE

    spec = parse_audit_spec({"group": "flip", "shifts": [], "options": TINY})
    start = time.perf_counter()
    report = run_audit(AuditRequest(path, spec, probes=probes()))
    seconds = time.perf_counter() - start
    section = report["model"]
    assert section["saliency_method"].startswith("integrated"), section["gradient_note"]
    assert section["gradient_path"].startswith("autograd"), section["gradient_path"]
    assert report["sensitivity"]["method"] == "autograd Jacobian"
    print(f"\nZOO | {name} | {how} | {section['gradient_path']} | {error:.1e} | {seconds:.1f} s | "
          f"{report['verdict']['label']} |")
