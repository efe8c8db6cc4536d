"""What the model cage costs: the same audit with the model in the engine's process and in its own cage.

Issue 17 moved every uploaded model into a process of its own (``jobs.cage``): the engine sends inputs and
receives logits and gradients over a socket pair. This times bench_scale's default audit (a random-weights
ResNet-18, 10 classes, 3x64x64 TorchScript, D4, the default spec and shifts, ``saliency_scope`` decisive)
both ways in one process, interleaved (in-process, caged, in-process, caged, ...), and prints the ratio.
The cage here is the real one: forked before any torch work, Landlock and seccomp applied, sealed fds.

    .venv/bin/python benchmarks/bench_cage.py [--probes 16] [--repeats 2] [--group D4] [--shape 3,64,64]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_seconds(*pids: int) -> float:
    """User + system CPU seconds of this process and of ``pids`` (the cage), from /proc."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in ("self", *map(str, pids)):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--noise-probes", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--group", default="D4")
    parser.add_argument("--shape", default="3,64,64")
    parser.add_argument("--arch", default="resnet18")
    args = parser.parse_args()
    shape = tuple(int(d) for d in args.shape.split(","))

    folder = Path(tempfile.mkdtemp(prefix="bench-cage-"))
    path = folder / f"{args.arch}.pt"
    path.write_bytes(b"")  # the cage's Landlock rule names this file: it must exist before the fork

    from audit_service.jobs.cage import start_cage

    cage = start_cage(folder / "cage", [str(path)])  # forked first, single-threaded, as the sandbox does

    import numpy as np
    import torch
    import torchvision

    from audit_service.engine.audit import AuditRequest, run_audit
    from audit_service.engine.spec import parse_audit_spec
    from bench_scale import CLASSES, export_torchscript

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.arch)(weights=None, num_classes=CLASSES)
    with torch.no_grad():  # BatchNorm statistics of N(0, 1) inputs, as bench_scale
        for _ in range(4):
            model(torch.randn(32, *shape))
    model.eval()
    export_torchscript(model, shape, path)
    x = np.random.default_rng(0).normal(size=(args.probes, *shape)).astype(np.float32)
    spec = parse_audit_spec({"group": args.group, "options": {"n_probes": args.probes, "device": "cpu",
                                                              "n_noise_probes": args.noise_probes}})
    warm = parse_audit_spec({"group": args.group, "shifts": [],
                             "options": {"n_probes": args.probes, "n_noise_probes": args.noise_probes,
                                         "device": "cpu", "saliency_scope": "none", "bootstrap": 0,
                                         "jacobian_probes": 0}})
    run_audit(AuditRequest(path, warm, x))
    run_audit(AuditRequest(path, warm, x, load=cage.load))

    times: dict[str, list[float]] = {"in-process": [], "caged": []}
    cpu: dict[str, list[float]] = {"in-process": [], "caged": []}
    reports: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, load in (("in-process", None), ("caged", cage.load)):
            start, cpu_start = time.perf_counter(), cpu_seconds(cage.pid)
            reports[name] = run_audit(AuditRequest(path, spec, x, **({"load": load} if load else {})))
            times[name].append(time.perf_counter() - start)
            cpu[name].append(cpu_seconds(cage.pid) - cpu_start)
            print(f"  {name:10s} {times[name][-1]:8.2f} s wall, {cpu[name][-1]:8.2f} s CPU (engine + cage)  verdict "
                  f"{reports[name]['verdict']['label']}", flush=True)
    cage.close()

    inproc, caged = min(times["in-process"]), min(times["caged"])
    inproc_cpu, caged_cpu = min(cpu["in-process"]), min(cpu["caged"])
    a, b = reports["in-process"], reports["caged"]
    same = a["verdict"]["label"] == b["verdict"]["label"]
    worst = max((abs(ca["metrics"][m] - cb["metrics"][m]) for ca, cb in zip(a["conditions"], b["conditions"])
                 for m in ("DI", "LI", "SI") if ca["metrics"].get(m) is not None and cb["metrics"].get(m) is not None),
                default=0.0)
    print(f"{args.arch} (random weights) {'x'.join(map(str, shape))} TorchScript, {args.group}, {args.probes} probes, "
          f"{args.noise_probes} noise probes, default spec, CPU, torch threads {torch.get_num_threads()}; "
          f"best of {args.repeats}")
    print(f"  in-process model: {inproc:8.2f} s wall, {inproc_cpu:8.2f} s CPU")
    print(f"  caged model     : {caged:8.2f} s wall = {caged / inproc:.3f}x in-process (target <= 1.10x); "
          f"{caged_cpu:8.2f} s CPU = {caged_cpu / inproc_cpu:.3f}x (the CPU ratio is the one other load on the "
          f"machine does not move)")
    print("  per condition, s (in-process / caged): " + "; ".join(
        f"{name} {a['timing']['conditions_s'][name]:.2f} / {b['timing']['conditions_s'][name]:.2f}"
        for name in a["timing"]["conditions_s"]) + f"; Jacobian {a['timing']['sensitivity_s']:.2f} / "
        f"{b['timing']['sensitivity_s']:.2f}")
    print(f"  verdicts {'identical' if same else 'DIFFERENT'} ({a['verdict']['label']}); largest DI/LI/SI "
          f"difference {worst:.2e}; gradient passes {b['model']['memory_format']['used']} (caged) vs "
          f"{a['model']['memory_format']['used']} (in-process)")


if __name__ == "__main__":
    main()
