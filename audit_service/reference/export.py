"""Write one trained reference model as files the service audits: ONNX, TorchScript, card.

``<out>/<name>/model.onnx``  dynamic batch, input ``input`` (N, 1, 36, 36) float32 in [0, 1], output ``logits``
``<out>/<name>/model.pt``    TorchScript (traced), ``_extra_files={"input_shape.json": "[1, 36, 36]"}``
``<out>/<name>/card.json``   training settings, accuracy, audit metrics and verdict, the paper's numbers
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .data import INPUT_SHAPE

ONNX_FILE, TORCHSCRIPT_FILE, CARD_FILE = "model.onnx", "model.pt", "card.json"
ONNX_OPSET = 17


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_model(model: torch.nn.Module, run_dir: str | Path) -> dict[str, str]:
    """Write ONNX and TorchScript files for ``model``; return {format: file name}."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.rand(2, *INPUT_SHAPE)

    onnx_path = run_dir / ONNX_FILE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated but needs no onnxscript
        torch.onnx.export(
            model, (example,), str(onnx_path), dynamo=False, opset_version=ONNX_OPSET,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; the service still reads it
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, str(run_dir / TORCHSCRIPT_FILE),
                       _extra_files={"input_shape.json": json.dumps(list(INPUT_SHAPE))})
    return {"onnx": ONNX_FILE, "torchscript": TORCHSCRIPT_FILE}


def check_export(model: torch.nn.Module, run_dir: str | Path, atol: float = 1e-4) -> dict[str, float]:
    """Max |logit difference| of the ONNX and TorchScript files against ``model`` on random inputs."""
    import onnxruntime as ort

    run_dir = Path(run_dir)
    x = torch.rand(33, *INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    sess = ort.InferenceSession(str(run_dir / ONNX_FILE), providers=["CPUExecutionProvider"])
    onnx_out = sess.run(None, {"input": x.numpy()})[0]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)
        ts = torch.jit.load(str(run_dir / TORCHSCRIPT_FILE), map_location="cpu")
        ts_out = ts(x).numpy()
    diffs = {"onnx": float(np.abs(onnx_out - ref).max()), "torchscript": float(np.abs(ts_out - ref).max())}
    bad = {k: v for k, v in diffs.items() if not v <= atol}
    if bad:
        raise RuntimeError(f"exported model differs from the trained one: {bad}")
    return diffs


def write_card(run_dir: str | Path, card: dict) -> Path:
    run_dir = Path(run_dir)
    files = card.get("files", {})
    card = {**card, "sha256": {fmt: sha256_file(run_dir / f) for fmt, f in files.items() if (run_dir / f).is_file()}}
    path = run_dir / CARD_FILE
    tmp = run_dir / "card.tmp.json"
    tmp.write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path
