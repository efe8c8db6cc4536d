"""Sweep benchmark: audit wall time over the compute floor, for a mid-size CNN.

The floor is the bare model work the audit needs, timed in the same process on the same device:
for every condition, one forward pass over the whole orbit batch (G x N samples) and the
integrated-gradients passes (n_steps forward + backward over G x N samples), plus the Jacobian's
C backward passes. Everything else the audit does (group actions, shifts, captum bookkeeping,
post-processing, metrics, bootstrap, report) is overhead; the ratio says how much.

    .venv/bin/python benchmarks/bench_sweep.py [--format torchscript|onnx] [--probes 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audit_service.engine.audit import AuditRequest, run_audit  # noqa: E402
from audit_service.engine.runtime import load_model  # noqa: E402
from audit_service.engine.spec import parse_audit_spec  # noqa: E402


class MidCNN(nn.Module):
    """~120k parameters, 1x32x32 input: the size of a small production digit / patch classifier."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 96), nn.ReLU(), nn.Linear(96, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def export(model: nn.Module, fmt: str, folder: Path) -> Path:
    example = torch.randn(2, 1, 32, 32)
    if fmt == "onnx":
        path = folder / "mid.onnx"
        torch.onnx.export(model, example, path, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, dynamo=False)
    else:
        path = folder / "mid.pt"
        torch.jit.save(torch.jit.trace(model, example), path, _extra_files={"input_shape.json": "[1, 32, 32]"})
    return path


def floor_seconds(module: nn.Module, n_conditions: int, group_order: int, n_probes: int, chunk: int,
                  ig_steps: int, jacobian_probes: int, n_noise: int, batch: int) -> float:
    """Time the bare passes the audit needs, with plain torch and the same batch sizes."""
    device = next(module.parameters(), torch.empty(0)).device
    start = time.perf_counter()
    for c in range(n_conditions):
        total = n_noise if c == n_conditions - 1 else n_probes
        for s in range(0, total, chunk):
            n = min(chunk, total - s) * group_order
            x = torch.randn(n, 1, 32, 32, device=device)
            with torch.no_grad():
                for b in range(0, n, batch):
                    module(x[b:b + batch])
            scaled = x.repeat(ig_steps, 1, 1, 1)
            for b in range(0, scaled.shape[0], batch):
                part = scaled[b:b + batch].requires_grad_(True)
                out = module(part)
                torch.autograd.grad(out[:, 0].sum(), part)
    x = torch.randn(jacobian_probes, 1, 32, 32, device=device, requires_grad=True)
    out = module(x)
    for k in range(out.shape[1]):
        torch.autograd.grad(out[:, k].sum(), x, retain_graph=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", choices=["torchscript", "onnx"], default="torchscript")
    parser.add_argument("--probes", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--group", default="D4")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = MidCNN().eval()
    spec = parse_audit_spec({
        "group": args.group,
        "shifts": [{"name": "gaussian_noise", "severity": 3}, {"name": "blur", "severity": 3}],
        "options": {"n_probes": args.probes, "n_noise_probes": args.probes, "ig_steps": 16, "jacobian_probes": 16,
                    "probe_chunk": 64, "batch_size": 1024, "bootstrap": 200},
    })
    probes = np.random.default_rng(0).normal(size=(args.probes, 1, 32, 32)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = export(model, args.format, Path(tmp))
        runner = load_model(path)
        module = runner.torch_module()
        if module is None:
            raise SystemExit(f"no differentiable twin for the floor: {runner.gradient_note}")
        order = 8 if args.group == "D4" else 4
        n_conditions = 2 + len(spec.effective_shifts)
        opts = spec.options
        run_audit(AuditRequest(path, spec, probes))  # warm-up: allocator, onnxruntime session, captum import
        audits, floors = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            report = run_audit(AuditRequest(path, spec, probes))
            audits.append(time.perf_counter() - t)
            floors.append(floor_seconds(module, n_conditions, order, args.probes, opts.probe_chunk, opts.ig_steps,
                                        opts.jacobian_probes, opts.n_noise_probes, opts.batch_size))
    audit_s, floor_s = min(audits), min(floors)
    print(f"model: MidCNN ({sum(p.numel() for p in model.parameters())} params) as {args.format} on "
          f"{report['timing']['device']}; group {args.group} (order {order}); {args.probes} probes; "
          f"{n_conditions} conditions; ig_steps {opts.ig_steps}; torch threads {torch.get_num_threads()}")
    print(f"audit wall time (best of {args.repeats}): {audit_s:.3f} s")
    print(f"compute floor   (best of {args.repeats}): {floor_s:.3f} s")
    print(f"ratio audit / floor: {audit_s / floor_s:.2f}x   (target <= 1.3x on the CPU)")


if __name__ == "__main__":
    main()
