"""Batch-1 programs at batch speed: the same audit of a ResNet-18 as TorchScript (dynamic batch) and as a
``torch.export`` program exported with the default (no dynamic shapes, so batch 1), in one process.

Issue 23 measured 6.8 s (TorchScript) against 134 s (.pt2) in the service; the runner now runs a fixed-batch
program over whole batches with ``torch.vmap`` (checked against one call per batch at load). Target: the
.pt2 audit within 1.5x of the TorchScript one.

    .venv/bin/python benchmarks/bench_batch1.py [--probes 16] [--group flip] [--shape 3,32,32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audit_service.engine.audit import run_audit  # noqa: E402
from audit_service.engine.spec import parse_audit_spec  # noqa: E402
from bench_scale import CLASSES, export_torchscript  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--group", default="flip")
    parser.add_argument("--shape", default="3,32,32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--without-vmap", action="store_true",
                        help="also time the .pt2 audit with one call per sample (the runner before issue 23)")
    args = parser.parse_args()
    shape = tuple(int(d) for d in args.shape.split(","))
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=CLASSES)
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(32, *shape))
    model.eval()
    folder = Path(tempfile.mkdtemp(prefix="bench-batch1-"))
    scripted = export_torchscript(model, shape, folder / "resnet18.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = folder / "resnet18_b1.pt2"
        torch.export.save(torch.export.export(model, (torch.randn(1, *shape),)), str(program))
    x = np.random.default_rng(0).normal(size=(args.probes, *shape)).astype(np.float32)
    spec = parse_audit_spec({"group": args.group, "options": {"n_probes": args.probes, "device": "cpu"}})
    times: dict[str, list[float]] = {"torchscript": [], "pt2 batch 1": []}
    reports = {}
    for _ in range(args.repeats):
        for name, path in (("torchscript", scripted), ("pt2 batch 1", program)):
            start = time.perf_counter()
            reports[name] = run_audit(path, spec, x)
            times[name].append(time.perf_counter() - start)
    if args.without_vmap:  # the old path, for the before/after figure: the vmap check says no
        from audit_service.engine.runtime import pt2_runner

        pt2_runner._BatchSizes.try_vmap = lambda self, shape, device: "one call per sample (vmap off)"
        start = time.perf_counter()
        run_audit(program, spec, x)
        times["pt2 batch 1, one call per sample"] = [time.perf_counter() - start]
    a, b = min(times["torchscript"]), min(times["pt2 batch 1"])
    print(f"resnet18 (random weights) {'x'.join(map(str, shape))}, {args.group}, {args.probes} probes, default spec, "
          f"CPU, torch threads {torch.get_num_threads()}; best of {args.repeats}")
    print(f"  TorchScript, dynamic batch: {a:7.2f} s  verdict {reports['torchscript']['verdict']['label']}")
    print(f"  .pt2 exported at batch 1  : {b:7.2f} s  = {b / a:.2f}x (target <= 1.5x)  verdict "
          f"{reports['pt2 batch 1']['verdict']['label']}; {reports['pt2 batch 1']['model']['providers'][-1]}")
    if args.without_vmap:
        c = times["pt2 batch 1, one call per sample"][0]
        print(f"  .pt2 batch 1 without vmap : {c:7.2f} s  = {c / a:.2f}x (one call per sample, as before)")
    for name, report in reports.items():
        timing = report["timing"]
        print(f"  {name:12s} load {timing['load_s']:.2f} s, conditions {timing['conditions_s']}, saliency "
              f"{timing['saliency_s']}, Jacobian {timing['sensitivity_s']:.2f} s, gradient passes "
              f"{report['model']['memory_format']['used']}")


if __name__ == "__main__":
    main()
