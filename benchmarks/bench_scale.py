"""Scale benchmark: a default-spec audit of a ResNet against the floors of its own method.

In one run, on the CPU (all figures from this process, so load on the machine shifts them together):
* a random-weights torchvision ResNet-18 (10 classes; BatchNorm statistics from N(0, 1) inputs, N(0, 1)
  probes, so it predicts several classes: not_invariant, not trivial) at 3x64x64 as TorchScript, default
  spec (D4, the default shifts: 11 conditions): the audit time with ``saliency_scope`` ``decisive`` (default) and
  ``all`` (the old behaviour), their verdicts, and the per-condition cost (forward / saliency seconds);
* the all-IG floor: the bare forward + backward passes of the method, conditions x elements x probes x
  (ig_steps + 1) samples, in the audit's batch sizes; and the forward-only floor (conditions x elements
  x probes forward passes under ``torch.inference_mode``);
* the pass cost: per-sample forward + backward at several batch sizes, channels-last vs contiguous, and
  optionally (``--compile``) ``torch.compile`` of the eager twin: compile time and when it pays back;
* the scaling in probes (64 -> 1024) of a default audit of a tiny CNN, each in a fresh subprocess:
  wall time and peak memory (ru_maxrss growth over the audit, tracemalloc peak of Python objects).
With CUDA, the same default audit of a ResNet-50 at 3x224x224 (D4, 64 probes); skipped otherwise.

    .venv/bin/python benchmarks/bench_scale.py [--probes 64] [--group D4] [--quick] [--compile] [--no-all]
        [--floor sampled|full] [--no-scaling] [--no-resnet] [--layouts] [--cases genuine,small,sets]

``--cases`` (issue 21: the models that pass) runs, each against the all-IG and forward-only floors of its own
module measured in the same run (wall and CPU seconds): a genuine orbit-averaged ResNet-18 (D4, 3x32x32), the
two-layer CNN (D4, 1x28x28) and a genuine DeepSets model under a sampled S_16 (256 elements).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audit_service.engine.audit import AuditRequest, run_audit  # noqa: E402
from audit_service.engine.groups import build_group  # noqa: E402
from audit_service.engine.runtime import load_model  # noqa: E402
from audit_service.engine.spec import parse_audit_spec  # noqa: E402

CLASSES = 10


def export_torchscript(model: nn.Module, shape: tuple[int, ...], path: Path) -> Path:
    example = torch.rand((2, *shape), generator=torch.Generator().manual_seed(1))
    torch.jit.save(torch.jit.trace(model, example, check_trace=False), str(path),
                   _extra_files={"input_shape.json": json.dumps(list(shape))})
    return path


def spec_for(group: str, probes: int, noise: int, scope: str, **options) -> object:
    return parse_audit_spec({"group": group, "options": {"n_probes": probes, "n_noise_probes": noise,
                                                         "saliency_scope": scope, **options}})


def timed_audit(path: Path, spec, x: np.ndarray) -> tuple[float, dict]:
    start = time.perf_counter()
    report = run_audit(AuditRequest(path, spec, x))
    return time.perf_counter() - start, report


#: CPU seconds (all threads of this process) of the floors timed so far: {"ig": ..., "fwd": ...}
FLOOR_CPU = {"ig": 0.0, "fwd": 0.0}


def condition_floor(module: nn.Module, shape: tuple[int, ...], order: int, total: int, chunk: int, ig_steps: int,
                    batch: int, device: torch.device) -> tuple[float, float]:
    """(IG s, forward s) of one condition's bare passes over ``total`` probes, in the audit's batch layout (their
    CPU seconds are added to ``FLOOR_CPU``)."""
    ig_s = fwd_s = 0.0
    for s in range(0, total, chunk):
        n = min(chunk, total - s) * order
        x = torch.rand(n, *shape, device=device)
        t, c = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for b in range(0, n, batch):
                module(x[b:b + batch])
        sync(device)
        fwd_s += time.perf_counter() - t
        FLOOR_CPU["fwd"] += time.process_time() - c
        t, c = time.perf_counter(), time.process_time()
        scaled = x.repeat(ig_steps, *([1] * len(shape)))
        per = max(batch, n)
        for b in range(0, scaled.shape[0], per):
            part = scaled[b:b + per].requires_grad_(True)
            out = module(part)
            torch.autograd.grad(out[:, 0].sum(), part)
        sync(device)
        ig_s += time.perf_counter() - t
        FLOOR_CPU["ig"] += time.process_time() - c
    return ig_s, fwd_s


def floors(module: nn.Module, shape: tuple[int, ...], n_conditions: int, order: int, probes: int, noise: int,
           chunk: int, ig_steps: int, batch: int, device: torch.device, sampled: bool) -> tuple[float, float]:
    """(all-IG floor, forward-only floor) in seconds: the bare passes, same batch layout as the audit.

    One condition is the noise condition (``noise`` probes), the others hold ``probes`` probes. Every condition of
    one size runs the same passes on tensors of the same shape, so ``sampled`` times one condition of each size and
    counts it ``n_conditions - 1`` times (resp. once): the same figure for a tenth of the wait. ``sampled=False``
    times every condition.
    """
    ig_s = fwd_s = 0.0
    if sampled:
        for total, times in ((probes, n_conditions - 1), (noise, 1)):
            before = dict(FLOOR_CPU)
            ig, fwd = condition_floor(module, shape, order, total, chunk, ig_steps, batch, device)
            ig_s += times * ig
            fwd_s += times * fwd
            for key in FLOOR_CPU:  # the CPU seconds counted like the wall seconds
                FLOOR_CPU[key] = before[key] + times * (FLOOR_CPU[key] - before[key])
    else:
        for c in range(n_conditions):
            total = noise if c == n_conditions - 1 else probes
            ig, fwd = condition_floor(module, shape, order, total, chunk, ig_steps, batch, device)
            ig_s += ig
            fwd_s += fwd
    return ig_s + fwd_s, fwd_s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pass_cost(model: nn.Module, shape: tuple[int, ...], batches: list[int], repeats: int = 2) -> None:
    """Per-sample forward + backward at several batch sizes, contiguous vs channels-last."""
    for fmt in ("contiguous", "channels_last"):
        memory = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        m = model.to(memory_format=memory)
        cells = []
        for b in batches:
            x = torch.rand(b, *shape).contiguous(memory_format=memory)
            best = float("inf")
            for _ in range(repeats):
                part = x.clone().requires_grad_(True)
                t = time.perf_counter()
                torch.autograd.grad(m(part)[:, 0].sum(), part)
                best = min(best, time.perf_counter() - t)
            cells.append(f"b={b}: {1000 * best / b:.2f} ms")
        x = torch.rand(batches[-1], *shape).contiguous(memory_format=memory)
        t = time.perf_counter()
        with torch.inference_mode():
            m(x)
        fwd = (time.perf_counter() - t) / batches[-1]
        print(f"  {fmt:13s} fwd+bwd per sample: {', '.join(cells)}; fwd-only (b={batches[-1]}) {1000 * fwd:.2f} ms")
    model.to(memory_format=torch.contiguous_format)


def layout_table() -> None:
    """Forward + backward a sample, contiguous vs channels-last, across architectures and image sizes: the
    measurement behind ``memory_format=auto`` (``audit_service/engine/runtime/layout.py``)."""
    small = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, CLASSES))
    cases = [("two-layer CNN", small, (1, 28, 28), 1024),
             ("resnet18", torchvision.models.resnet18(num_classes=CLASSES), (3, 16, 16), 512),
             ("resnet18", torchvision.models.resnet18(num_classes=CLASSES), (3, 32, 32), 512),
             ("resnet18", torchvision.models.resnet18(num_classes=CLASSES), (3, 64, 64), 256),
             ("mobilenet_v3_small", torchvision.models.mobilenet_v3_small(num_classes=CLASSES), (3, 64, 64), 256),
             ("efficientnet_b0", torchvision.models.efficientnet_b0(num_classes=CLASSES), (3, 64, 64), 128)]
    print(f"channels-last vs contiguous, forward + backward a sample (best of 3), {torch.get_num_threads()} "
          "threads; weights converted, inputs as the audit passes them (contiguous):")
    for name, model, shape, batch in cases:
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        cost = {}
        for fmt, memory in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
            model.to(memory_format=memory)
            x = torch.rand(batch, *shape)
            best = float("inf")
            for _ in range(3):
                part = x.clone().requires_grad_(True)
                t = time.perf_counter()
                torch.autograd.grad(model(part)[:, 0].sum(), part)
                best = min(best, time.perf_counter() - t)
            cost[fmt] = 1000 * best / batch
        print(f"  {name:20s} {'x'.join(map(str, shape)):8s} b={batch:4d}: contiguous {cost['contiguous']:.3f} ms, "
              f"channels-last {cost['channels_last']:.3f} ms -> {cost['contiguous'] / cost['channels_last']:.2f}x")


def compile_cost(model: nn.Module, shape: tuple[int, ...], batch: int, passes_in_audit: int) -> None:
    """torch.compile of the eager twin: compile time vs the per-pass saving, and the break-even."""
    x = torch.rand(batch, *shape)

    def step(m):
        part = x.clone().requires_grad_(True)
        t = time.perf_counter()
        torch.autograd.grad(m(part)[:, 0].sum(), part)
        return time.perf_counter() - t

    eager = min(step(model) for _ in range(2))
    compiled = torch.compile(model)
    t = time.perf_counter()
    step(compiled)
    first = time.perf_counter() - t
    steady = min(step(compiled) for _ in range(2))
    saving = eager - steady
    print(f"  torch.compile: first call {first:.1f} s (compile), steady {steady:.3f} s vs eager {eager:.3f} s "
          f"per batch of {batch}")
    if saving > 0:
        need = (first - steady) / saving
        print(f"  pays back after {need:.0f} batches; this audit runs ~{passes_in_audit} such batches: "
              f"{'worth it' if need < passes_in_audit else 'not worth it'}")
    else:
        print("  no steady-state saving: never pays back on this device")


# ----------------------------------------------------------------------------- probe scaling (subprocess)
class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                 nn.Flatten(), nn.Linear(64, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def scaling_child(probes: int, group: str, folder: Path) -> None:
    """One audit of the tiny CNN in this fresh process; prints JSON (seconds, memory)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    path = folder / "tiny.pt"
    x = np.random.default_rng(0).normal(size=(probes, 1, 16, 16)).astype(np.float32)
    spec = spec_for(group, probes, 32, "decisive", jacobian_probes=8, bootstrap=50)
    warm_up = spec_for(group, 64, 32, "decisive", jacobian_probes=8, bootstrap=0)
    run_audit(AuditRequest(path, warm_up, x[:64]))  # warm-up
    rss_before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak below is this audit's alone
    tracemalloc.start()
    seconds, report = timed_audit(path, spec, x)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(json.dumps({"probes": probes, "seconds": seconds, "rss_before_mb": rss_before,
                      "peak_rss_mb": _status_mb("VmHWM"), "tracemalloc_peak_mb": peak / 2**20,
                      "verdict": report["verdict"]["label"]}))


def _status_mb(key: str) -> float:
    """A ``/proc/self/status`` memory figure (kB there) in MB. ``ru_maxrss`` would not do: a child starts
    with its parent's high-water mark, and the parent here held a ResNet's activations."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def probe_scaling(counts: list[int], group: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        export_torchscript(TinyCNN().eval(), (1, 16, 16), Path(tmp) / "tiny.pt")
        rows = []
        for n in counts:
            out = subprocess.run([sys.executable, __file__, "--_scaling-child", str(n), "--group", group,
                                  "--_folder", tmp], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"probe scaling (tiny CNN 1x16x16, {group}, default spec, 32 noise probes; fresh process each, warmed "
          "up by a 64-probe audit; peak RSS is the audit's own high-water mark (VmHWM reset before it), so a "
          "flat figure means memory bounded by the chunk, not the probe count):")
    for r in rows:
        print(f"  {r['probes']:5d} probes: {r['seconds']:7.2f} s ({r['seconds'] / base['seconds']:.2f}x for "
              f"{r['probes'] / base['probes']:.0f}x probes), peak RSS {r['peak_rss_mb']:.0f} MB (RSS before "
              f"{r['rss_before_mb']:.0f} MB), tracemalloc peak {r['tracemalloc_peak_mb']:.1f} MB, "
              f"verdict {r['verdict']}")
    marginal = [(b["seconds"] - a["seconds"]) / (b["probes"] - a["probes"]) for a, b in zip(rows, rows[1:])]
    print("  marginal cost a probe: " + ", ".join(f"{1000 * m:.1f} ms ({a['probes']}->{b['probes']})"
                                                 for m, a, b in zip(marginal, rows, rows[1:])) +
          " (the 32 noise probes and the Jacobian are a fixed cost)")


# ----------------------------------------------------------------------------- the ResNet audit
def resnet_audit(name: str, shape: tuple[int, ...], group: str, probes: int, noise: int, device: str,
                 with_all: bool, compile_flag: bool, floor: str = "sampled") -> None:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=CLASSES)
    with torch.no_grad():  # BatchNorm statistics of N(0, 1) inputs (normalised images): several classes predicted
        for _ in range(4):
            model(torch.randn(32, *shape))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    dev = torch.device(device)
    x = np.random.default_rng(0).normal(size=(probes, *shape)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_torchscript(model, shape, Path(tmp) / f"{name}.pt")
        decisive = spec_for(group, probes, noise, "decisive", device=device)
        opts = decisive.options
        module = load_model(path, device=device).torch_module()  # the module the audit differentiates
        # Warm-up on the audit's own shapes (allocator, oneDNN primitives, the TorchScript profiler): the forward
        # passes of two conditions and one fwd+bwd batch; cheap next to the audit, unlike a whole IG condition.
        warm = parse_audit_spec({"group": group, "shifts": [],
                                 "options": {"n_probes": probes, "n_noise_probes": noise, "device": device,
                                             "saliency_scope": "none", "bootstrap": 0, "jacobian_probes": 0}})
        run_audit(AuditRequest(path, warm, x))
        order = len(build_group(decisive.group, shape).element_names)
        condition_floor(module, shape, order, min(probes, opts.probe_chunk), opts.probe_chunk, 2,
                        opts.batch_size, dev)
        t_dec, rep_dec = timed_audit(path, decisive, x)
        t_contig, rep_contig = timed_audit(path, spec_for(group, probes, noise, "decisive", device=device,
                                                          memory_format="contiguous"), x)
        n_conditions = len(rep_dec["conditions"])
        t_floor = time.perf_counter()
        ig_floor, fwd_floor = floors(module, shape, n_conditions, order, probes, noise, opts.probe_chunk,
                                     opts.ig_steps, opts.batch_size, dev, floor == "sampled")
        t_floor = time.perf_counter() - t_floor
        print(f"{name} (random weights, {CLASSES} classes) {'x'.join(map(str, shape))} as TorchScript on "
              f"{rep_dec['timing']['device']}; {group} (order {order}); {probes} probes, {noise} noise probes; "
              f"{n_conditions} conditions; ig_steps {opts.ig_steps}; torch threads {torch.get_num_threads()}")
        how = ("one condition of each size timed, counted per condition" if floor == "sampled"
               else "every condition timed")
        print(f"  all-IG floor      : {ig_floor:8.2f} s  ({n_conditions} conditions x {order} elements x probes x "
              f"{opts.ig_steps + 1} passes; {how}; {t_floor:.0f} s of passes timed)")
        print(f"  forward-only floor: {fwd_floor:8.2f} s")
        print(f"  audit decisive    : {t_dec:8.2f} s = {t_dec / ig_floor:.3f}x the all-IG floor (target <= 0.3x); "
              f"verdict {rep_dec['verdict']['label']}; SI on {rep_dec['saliency']['computed_on']}; gradient "
              f"passes {rep_dec['model']['memory_format']['used']}")
        print(f"  audit decisive, memory_format=contiguous: {t_contig:8.2f} s = {t_contig / ig_floor:.3f}x the floor; "
              f"channels-last saves {t_contig / t_dec:.2f}x; verdict {rep_contig['verdict']['label']}", flush=True)
        t_all, rep_all = timed_audit(path, spec_for(group, probes, noise, "all", device=device), x) if with_all \
            else (None, None)
    if t_all is not None:
        same = rep_all["verdict"]["label"] == rep_dec["verdict"]["label"]
        print(f"  audit all         : {t_all:8.2f} s = {t_all / ig_floor:.3f}x the all-IG floor; verdict "
              f"{rep_all['verdict']['label']} ({'same' if same else 'DIFFERENT'} verdict)")
    print("  per condition (decisive: total s / saliency s" + (" | all: total s)" if t_all else ")"))
    for name_c, secs in rep_dec["timing"]["conditions_s"].items():
        extra = f" | {rep_all['timing']['conditions_s'][name_c]:7.2f}" if t_all else ""
        print(f"    {name_c:22s} {secs:7.2f} / {rep_dec['timing']['saliency_s'][name_c]:7.2f}{extra}")
    print(f"    {'sensitivity (Jacobian)':22s} {rep_dec['timing']['sensitivity_s']:7.2f}")
    if dev.type == "cpu":
        print("pass cost (ResNet, CPU):")
        pass_cost(model, shape, [16, 64, 256])
        if compile_flag:
            batches = n_conditions * -(-probes // opts.probe_chunk) * opts.ig_steps
            compile_cost(model, shape, min(opts.batch_size, order * probes), batches)
        else:
            print("  torch.compile not measured (pass --compile; on 2 CPU cores it compiles for about a minute)")


# ----------------------------------------------------------------------------- issue 21: the models that pass
class OrbitAveraged(nn.Module):
    """The mean of ``base``'s logits over the D4 orbit of a square image: genuinely D4-invariant."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
        views += [torch.flip(v, dims=(-1,)) for v in views]
        return torch.stack([self.base(v) for v in views]).mean(dim=0)


class DeepSets(nn.Module):
    """A sum over per-element features of a set of scalars: invariant to every permutation of the set. The logits
    are standardized per class over N(0, 1) sets (fixed buffers), so that random weights predict several classes
    (not ``trivial``)."""

    def __init__(self, n: int = 16) -> None:
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.rho = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, CLASSES))
        with torch.no_grad():
            raw = self._raw(torch.randn(512, n, generator=torch.Generator().manual_seed(0)))
        self.register_buffer("mu", raw.mean(0))
        self.register_buffer("sigma", raw.std(0))

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.rho(self.phi(x.unsqueeze(-1)).sum(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self._raw(x) - self.mu) / self.sigma


def _calibrated(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """BatchNorm statistics of N(0, 1) inputs (several classes predicted), eval mode, no parameter gradients."""
    with torch.no_grad():
        for _ in range(4):
            model.train()(torch.randn(32, *shape))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def pass_case(label: str, model: nn.Module, shape: tuple[int, ...], group: dict | str, probes: int, noise: int,
              target: str) -> None:
    """One default-spec audit (``decisive``: sequential SI, completeness-chosen IG nodes) against the all-IG and
    forward-only floors of the same module, measured in this run; wall and CPU seconds."""
    x = np.random.default_rng(0).normal(size=(probes, *shape)).astype(np.float32)
    dev = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        path = export_torchscript(model, shape, Path(tmp) / "model.pt")
        spec = parse_audit_spec({"group": group, "options": {"n_probes": probes, "n_noise_probes": noise}})
        opts = spec.options
        warm = parse_audit_spec({"group": group, "shifts": [],
                                 "options": {"n_probes": probes, "n_noise_probes": noise, "saliency_scope": "none",
                                             "bootstrap": 0, "jacobian_probes": 0}})
        run_audit(AuditRequest(path, warm, x))  # warm-up: allocator, oneDNN primitives, the TorchScript profiler
        module = load_model(path, device="cpu").torch_module()
        order = len(build_group(spec.group, shape).element_names)
        condition_floor(module, shape, order, min(probes, opts.probe_chunk), opts.probe_chunk, 2, opts.batch_size,
                        dev)
        cpu = time.process_time()
        t_audit, report = timed_audit(path, spec, x)
        cpu_audit = time.process_time() - cpu
        n_conditions = len(report["conditions"])
        FLOOR_CPU.update(ig=0.0, fwd=0.0)
        ig_floor, fwd_floor = floors(module, shape, n_conditions, order, probes, noise, opts.probe_chunk,
                                     opts.ig_steps, opts.batch_size, dev, True)
    cpu_ig, cpu_fwd = FLOOR_CPU["ig"] + FLOOR_CPU["fwd"], FLOOR_CPU["fwd"]
    sampling = [c.get("saliency_sampling") for c in report["conditions"]]
    used = [f"{c['name']} {s['probes_used']}/{s['probes_cap']} {s['stopped']}" for c, s in
            zip(report["conditions"], sampling) if s]
    steps = next((s["ig_steps"] for s in sampling if s), None)
    print(f"{label}: {'x'.join(map(str, shape))}, group order {order}, {probes} probes, {noise} noise probes, "
          f"{n_conditions} conditions, default spec; torch threads {torch.get_num_threads()}")
    print(f"  all-IG floor      : {ig_floor:8.2f} s (CPU {cpu_ig:8.2f} s; {opts.ig_steps} + 1 passes a sample, "
          "one condition of each size timed)")
    print(f"  forward-only floor: {fwd_floor:8.2f} s (CPU {cpu_fwd:8.2f} s)")
    print(f"  audit             : {t_audit:8.2f} s (CPU {cpu_audit:8.2f} s) = {t_audit / ig_floor:.3f}x the all-IG "
          f"floor (CPU {cpu_audit / cpu_ig:.3f}x), {t_audit / fwd_floor:.2f}x the forward-only floor (CPU "
          f"{cpu_audit / cpu_fwd:.2f}x); target {target}; verdict {report['verdict']['label']}")
    print(f"  IG nodes {steps}; SI probes: {', '.join(used)}")
    timing = report["timing"]
    print(f"  timing: load {timing['load_s']:.2f} s, conditions {sum(timing['conditions_s'].values()):.2f} s "
          f"(saliency {sum(timing['saliency_s'].values()):.2f} s), Jacobian {timing['sensitivity_s']:.2f} s, "
          f"total {timing['total_s']:.2f} s", flush=True)


def genuine_resnet(probes: int, noise: int) -> None:
    torch.manual_seed(0)
    base = _calibrated(torchvision.models.resnet18(weights=None, num_classes=CLASSES), (3, 32, 32))
    pass_case("genuine orbit-averaged ResNet-18 (random weights)", OrbitAveraged(base).eval(), (3, 32, 32), "D4",
              probes, noise, "<= 0.3x the all-IG floor, genuine")


def small_cnn(probes: int, noise: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, CLASSES)).eval()
    pass_case("two-layer CNN (random weights)", model, (1, 28, 28), "D4", probes, noise, "<= 0.3x the all-IG floor")


def sampled_sets(probes: int, noise: int, elements: int = 256) -> None:
    torch.manual_seed(0)
    n = 16
    group = {"name": "permutation", "generators": [[1, 0, *range(2, n)], [*range(1, n), 0]], "sample": elements,
             "seed": 0}
    pass_case(f"genuine DeepSets under a sampled S_{n} ({elements} elements)", DeepSets().eval(), (n,), group,
              probes, noise, "<= 3x the forward-only floor, genuine")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, default=64)
    parser.add_argument("--noise-probes", type=int, default=32)
    parser.add_argument("--group", default="D4")
    parser.add_argument("--quick", action="store_true", help="ResNet-18 on 4 probes (flip), scaling 64 -> 256")
    parser.add_argument("--compile", action="store_true", help="measure torch.compile of the eager twin")
    parser.add_argument("--no-all", action="store_true", help="skip the saliency_scope=all audit")
    parser.add_argument("--floor", choices=("sampled", "full"), default="sampled",
                        help="time one condition of each size (sampled) or every condition (full) for the floors")
    parser.add_argument("--no-scaling", action="store_true", help="skip the probe-scaling runs")
    parser.add_argument("--no-resnet", action="store_true", help="skip the ResNet-18 CPU audit")
    parser.add_argument("--cases", default="",
                        help="comma-separated issue-21 cases to run instead of the rest: genuine (orbit-averaged "
                             "ResNet-18, D4, 3x32x32), small (two-layer CNN, D4, 1x28x28), sets (DeepSets, sampled "
                             "S_16, 256 elements)")
    parser.add_argument("--layouts", action="store_true",
                        help="only the channels-last vs contiguous pass cost across architectures (~2 min)")
    parser.add_argument("--_scaling-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._scaling_child is not None:
        scaling_child(args._scaling_child, args.group, Path(args._folder))
        return
    if args.layouts:
        layout_table()
        return
    if args.cases:
        runners = {"genuine": genuine_resnet, "small": small_cnn, "sets": sampled_sets}
        for case in args.cases.split(","):
            runners[case](args.probes, args.noise_probes)
        return
    group = "flip" if args.quick else args.group
    probes, noise = (4, 4) if args.quick else (args.probes, args.noise_probes)
    if not args.no_resnet:
        resnet_audit("resnet18", (3, 64, 64), group, probes, noise, "cpu", not args.no_all, args.compile,
                     args.floor)
    if not args.no_scaling:
        probe_scaling([64, 256] if args.quick else [64, 256, 1024], "flip" if args.quick else "C4")
    if torch.cuda.is_available():
        resnet_audit("resnet50", (3, 224, 224), "D4", 64, 32, "cuda", not args.no_all, False, args.floor)
    else:
        print("ResNet-50 3x224x224 on CUDA: skipped (torch.cuda.is_available() is False on this machine)")


if __name__ == "__main__":
    main()
