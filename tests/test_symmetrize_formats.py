"""``symmetrize`` for every accepted format: a TorchScript archive (traced and scripted, with and without a recorded
shape), a ``torch.export`` program (dynamic batch and batch 1) and ONNX, symmetrized by the CLI into ONNX and
re-audited ``genuine``; the Python API takes the same files and wraps them in memory."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from audit_service import audit, symmetrize
from builders import IMAGE_SHAPE, PlainCNN, export_onnx, export_torchscript
from conftest import ROOT

OPTS = {"n_probes": 16, "n_noise_probes": 8, "ig_steps": 4, "jacobian_probes": 2, "bootstrap": 20, "device": "cpu"}


def _export(kind: str, module: torch.nn.Module, folder) -> tuple:
    """(the file, the CLI's extra arguments) for ``kind``."""
    example = torch.rand(2, *IMAGE_SHAPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "torchscript (traced, shape recorded)":
            return export_torchscript(module, IMAGE_SHAPE, folder / "m.pt"), []
        if kind == "torchscript (scripted, no shape)":
            path = export_torchscript(module, IMAGE_SHAPE, folder / "m.pt", script=True, record_shape=False)
            return path, ["--input-shape", ",".join(map(str, IMAGE_SHAPE))]
        if kind == "pt2 (dynamic batch)":
            program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        elif kind == "pt2 (batch 1)":
            program = torch.export.export(module, (example[:1],))
        else:
            return export_onnx(module, IMAGE_SHAPE, folder / "m.onnx"), []
        torch.export.save(program, str(folder / "m.pt2"))
        return folder / "m.pt2", []


# the fast lane keeps the traced TorchScript and the ONNX export (each a CLI run: 5-9 CPU s)
KINDS = ["torchscript (traced, shape recorded)",
         pytest.param("torchscript (scripted, no shape)", marks=pytest.mark.slow),
         pytest.param("pt2 (dynamic batch)", marks=pytest.mark.slow),
         pytest.param("pt2 (batch 1)", marks=pytest.mark.slow), "onnx"]  # batch 1: exported one call per sample


@pytest.mark.parametrize("kind", KINDS)
def test_the_cli_symmetrizes_every_format_into_a_genuine_model(kind, tmp_path):
    module = PlainCNN().eval()
    path, extra = _export(kind, module, tmp_path)
    out = tmp_path / "fixed.onnx"
    cli = subprocess.run([sys.executable, "-m", "audit_service.cli", "symmetrize", str(path), "--group", "C4",
                          *extra, "-o", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "4 forward passes" in cli.stdout and not (tmp_path / "fixed.onnx.data").exists()

    probes = torch.rand(16, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(1))
    result = audit(out, "C4", probes, shifts=[{"name": "blur", "severity": 3}], **OPTS)
    assert result.label == "genuine", result.verdict.reasons
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    batch = int(session.get_inputs()[0].shape[0]) if isinstance(session.get_inputs()[0].shape[0], int) else 5
    x = probes[:batch]
    logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():  # the orbit average of the original module
        expected = torch.stack([module(torch.rot90(x, k, (2, 3))) for k in range(4)]).mean(0).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["torchscript (traced, shape recorded)", "pt2 (dynamic batch)", "onnx"])
def test_the_python_api_symmetrizes_a_file(kind, tmp_path):
    module = PlainCNN().eval()
    path, _ = _export(kind, module, tmp_path)
    fixed = symmetrize(path, "C4").eval()  # the file gives its own input shape
    x = torch.rand(5, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = torch.stack([module(torch.rot90(x, k, (2, 3))) for k in range(4)]).mean(0)
        torch.testing.assert_close(fixed(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fixed(torch.rot90(x, 1, (2, 3))), fixed(x), rtol=1e-5, atol=1e-6)
