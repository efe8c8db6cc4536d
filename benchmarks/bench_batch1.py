"""Batch-1 programs at batch speed: the same audit of a ResNet-18 as TorchScript (dynamic batch) and as a
``torch.export`` program exported with the default (no dynamic shapes, so batch 1), in one process.

Issue 23 measured 6.8 s (TorchScript) against 134 s (.pt2) in the service; the runner now runs a fixed-batch
program over whole batches with ``torch.vmap`` (checked against one call per batch at load). Target: the
.pt2 audit within 1.5x of the TorchScript one. The same model exported to ONNX at batch 1 (``torch.onnx.export``
with no dynamic shapes) is timed too: its batch is relaxed (``runtime.onnx_batch``); ``--without-relax`` times
it with one run per sample, as before. Each line gives wall-clock and this process's CPU time.

    .venv/bin/python benchmarks/bench_batch1.py [--probes 16] [--group flip] [--shape 3,32,32] [--repeats 2]
        [--without-vmap] [--without-relax] [--no-pt2]
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

from audit_service.engine.audit import AuditRequest, run_audit  # noqa: E402
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
    parser.add_argument("--without-relax", action="store_true",
                        help="also time the batch-1 ONNX audit with one run per sample (the runner before issue 23)")
    parser.add_argument("--no-pt2", action="store_true", help="skip the .pt2 case (the ONNX figures alone)")
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
    example = torch.randn(1, *shape)
    models = {"torchscript": scripted}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not args.no_pt2:
            models["pt2 batch 1"] = folder / "resnet18_b1.pt2"
            torch.export.save(torch.export.export(model, (example,)), str(models["pt2 batch 1"]))
        models["onnx batch 1 (dynamo)"] = folder / "resnet18_b1_dynamo.onnx"
        torch.onnx.export(model, (example,), str(models["onnx batch 1 (dynamo)"]))  # the default: weights in .data
        models["onnx batch 1 (legacy)"] = folder / "resnet18_b1_legacy.onnx"
        torch.onnx.export(model, (example,), str(models["onnx batch 1 (legacy)"]), dynamo=False)
    x = np.random.default_rng(0).normal(size=(args.probes, *shape)).astype(np.float32)
    spec = parse_audit_spec({"group": args.group, "options": {"n_probes": args.probes, "device": "cpu"}})
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    reports = {}
    for _ in range(args.repeats):
        for name, path in models.items():
            reports[name], timed = _timed(lambda: run_audit(AuditRequest(path, spec, x)))
            times[name].append(timed)
            print(f"  ({name}: {timed[0]:.2f} s wall, {timed[1]:.2f} s cpu)", flush=True)
    if args.without_vmap and not args.no_pt2:  # the old path, for the before/after figure: the vmap check says no
        from audit_service.engine.runtime import pt2_runner

        pt2_runner._BatchSizes.try_vmap = lambda self, shape, device: "one call per sample (vmap off)"
        name = "pt2 batch 1, one call per sample"
        reports[name], timed = _timed(lambda: run_audit(AuditRequest(models["pt2 batch 1"], spec, x)))
        times[name] = [timed]
    if args.without_relax:  # the old ONNX path: the graph's batch left fixed
        from audit_service.engine.runtime.onnx_runner import OnnxRunner

        OnnxRunner._try_relaxed_batch = lambda self, device: "one run per sample (relaxing off)"
        name = "onnx batch 1 (dynamo), one run per sample"
        reports[name], timed = _timed(lambda: run_audit(AuditRequest(models["onnx batch 1 (dynamo)"], spec, x)))
        times[name] = [timed]
    base_wall, base_cpu = min(times["torchscript"])
    print(f"resnet18 (random weights) {'x'.join(map(str, shape))}, {args.group}, {args.probes} probes, default spec, "
          f"CPU, torch threads {torch.get_num_threads()}; best of {args.repeats} (one run for the 'one ... per "
          f"sample' lines); wall-clock, then CPU time, each as a ratio to TorchScript (target <= 1.5x)")
    for name, runs in times.items():
        wall, cpu = min(runs)
        report = reports[name]
        print(f"  {name:42s}: {wall:7.2f} s = {wall / base_wall:5.2f}x  cpu {cpu:7.2f} s = {cpu / base_cpu:5.2f}x  "
              f"verdict {report['verdict']['label']}; {report['model']['providers'][-1]}")
    for name, report in reports.items():
        timing = report["timing"]
        print(f"  {name:42s} load {timing['load_s']:.2f} s, conditions {timing['conditions_s']}, saliency "
              f"{timing['saliency_s']}, Jacobian {timing['sensitivity_s']:.2f} s, gradient passes "
              f"{report['model']['memory_format']['used']}, {report['model']['gradient_path'][:60]}")


def _timed(run):
    """(what ``run`` returns, (wall-clock s, this process's CPU s))."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = run()
    return out, (time.perf_counter() - wall, time.process_time() - cpu)

if __name__ == "__main__":
    main()
