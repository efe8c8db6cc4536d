"""Integrated-gradients steps: SI against a 128-step reference, and what the completeness rule chooses.

For each model, on the clean probes' orbits: SI (mean over probes and g != e, the verdict's) from Gauss-Legendre
IG with 4, 8 and 16 nodes (16: the fixed count before issue 21), with the count the audit chooses from the
completeness error (``metrics.saliency.IntegratedGradientsSteps``, cap 16), and with 128 nodes (the reference);
the relative completeness error of each; the wall and CPU time of each against the 16-node pass.

Models: the shipped reference runs (TorchScript, ``audit_service/reference/runs/``; 36x36 test digits, their own
group) and random-weights torchvision networks at 3x32x32 (C4; BatchNorm statistics from N(0, 1) inputs).

    .venv/bin/python benchmarks/bench_ig.py [--probes 8] [--runs R4_DA_s0,R4_IR_s0,...] [--no-torchvision]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audit_service.engine.groups import build_group  # noqa: E402
from audit_service.engine.inputs import CheckedInputs  # noqa: E402
from audit_service.engine.metrics.saliency import integrated_gradients  # noqa: E402
from audit_service.engine.plan import SI_CONFIDENCE, AuditPlan  # noqa: E402
from audit_service.engine.runtime import load_model  # noqa: E402
from audit_service.engine.sequential import relative_completeness  # noqa: E402
from audit_service.engine.spec import Options, parse_audit_spec  # noqa: E402
from audit_service.engine.sweep import Condition, OrbitSweep  # noqa: E402

REFERENCE_STEPS = 128
CAP = 16
DEFAULT_RUNS = ("R4_WT_s0", "R4_DA_s0", "R4_IR_s0", "T3_WT_s0", "T3_DA_s0", "T3_IR_s0")


def clean_si(module: torch.nn.Module, runner, group, x: torch.Tensor, steps: int, adaptive: bool
             ) -> tuple[float, float | None, int, float, float]:
    """(SI over g != e, relative completeness error, steps used, wall s, CPU s) of one clean pass."""
    options = Options(n_probes=x.shape[0], probe_chunk=x.shape[0], ig_steps=steps, bootstrap=0)
    saliency = integrated_gradients(module, steps, options.batch_size, adaptive=adaptive)
    inputs = CheckedInputs(runner, x, None, None, group, [], [], "logits", options.seed)
    plan = AuditPlan(scope="all", sequential=False, confidence=SI_CONFIDENCE, si_threshold=1.0, early_stop=False,
                     saliency=saliency)
    sweep = OrbitSweep(inputs, plan, options)
    wall, cpu = time.perf_counter(), time.process_time()
    result = sweep.run(Condition("clean"), saliency=True)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    si = float(np.nanmean(result.accumulator.values("SI", identity=False)))
    return si, relative_completeness(result.completeness), saliency.ig.steps, wall, cpu


def compare(name: str, path: Path, group_spec: dict, x: np.ndarray) -> dict:
    runner = load_model(path, device="cpu")
    module = runner.torch_module()
    group = build_group(parse_audit_spec({"group": group_spec}).group, runner.input_shape)
    probes = torch.from_numpy(np.array(x))
    for _ in range(2):  # warm-up: a TorchScript module profiles its first calls
        clean_si(module, runner, group, probes, 4, adaptive=False)
    ref = clean_si(module, runner, group, probes, REFERENCE_STEPS, adaptive=False)
    rows = {"reference": ref}
    for steps in (4, 8, 16):
        rows[f"fixed{steps}"] = clean_si(module, runner, group, probes, steps, adaptive=False)
    fixed16 = rows["fixed16"]
    # the audit's rule: the count is chosen once per audit (calibration on 16 samples), then used for every batch
    calibrate = time.perf_counter()
    chosen = integrated_gradients(module, CAP, 1024, adaptive=True)
    flat = group.orbit(probes).reshape(-1, *probes.shape[1:])[:16]
    chosen.attribute(flat, runner.logits(flat).argmax(-1))
    calibrate = time.perf_counter() - calibrate
    rows["chosen"] = rows[f"fixed{chosen.ig.steps}"]
    print(f"{name} ({group_spec['name']}, {len(group.element_names)} elements, {x.shape[0]} probes): SI at "
          f"{REFERENCE_STEPS} nodes {ref[0]:.4f} (completeness error {_pct(ref[1])}); the rule tried "
          + ", ".join(f"{s} nodes {_pct(e)}" for s, e in chosen.ig.tried) + f" in {calibrate:.2f} s")
    for key in ("fixed4", "fixed8", "fixed16", "chosen"):
        si, err, steps, wall, cpu = rows[key]
        print(f"  {key:8s} {steps:3d} nodes: SI {si:.4f} (|diff| {abs(si - ref[0]):.4f}), completeness error "
              f"{_pct(err)}, time {wall:.2f} s = {wall / fixed16[3]:.2f}x of 16 nodes (CPU {cpu / fixed16[4]:.2f}x)")
    return {key: (abs(v[0] - ref[0]), v[2], v[3] / fixed16[3], v[4] / fixed16[4]) for key, v in rows.items()}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def reference_cases(runs: list[str], probes: int) -> list[tuple[str, Path, dict, np.ndarray]]:
    from audit_service.reference.catalog import get_reference_run, reference_model_path
    from audit_service.reference.data import load_digits
    from audit_service.reference.groups import group_spec

    digits = np.asarray(load_digits().test.x[:probes], dtype=np.float32)
    return [(run, reference_model_path(run, "torchscript"), group_spec(get_reference_run(run)["group"]), digits)
            for run in runs]


def torchvision_cases(folder: Path, probes: int) -> list[tuple[str, Path, dict, np.ndarray]]:
    import json

    shape = (3, 32, 32)
    cases = []
    for name in ("resnet18", "mobilenet_v3_small"):
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None, num_classes=10)
        with torch.no_grad():
            for _ in range(4):
                model(torch.randn(32, *shape))
        model.eval()
        path = folder / f"{name}.pt"
        example = torch.rand(2, *shape, generator=torch.Generator().manual_seed(1))
        torch.jit.save(torch.jit.trace(model, example, check_trace=False), str(path),
                       _extra_files={"input_shape.json": json.dumps(list(shape))})
        x = np.random.default_rng(0).normal(size=(probes, *shape)).astype(np.float32)
        cases.append((name, path, {"name": "C4"}, x))
    return cases


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS))
    parser.add_argument("--no-torchvision", action="store_true")
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}; Gauss-Legendre IG, zero baseline; SI over g != e on the "
          f"clean orbits; reference {REFERENCE_STEPS} nodes; 'chosen': the audit's rule (cap {CAP})")
    worst: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cases = reference_cases([r for r in args.runs.split(",") if r], args.probes)
        if not args.no_torchvision:
            cases += torchvision_cases(Path(tmp), args.probes)
        chosen = []
        for case in cases:
            out = compare(*case)
            for key, (diff, _, _, _) in out.items():
                worst[key] = max(worst.get(key, 0.0), diff)
            chosen.append(out["chosen"])
    print("largest |SI - SI at 128 nodes| over the models: " +
          ", ".join(f"{k} {v:.4f}" for k, v in worst.items() if k != "reference"))
    print("chosen node counts: " + ", ".join(str(c[1]) for c in chosen) +
          f"; time against 16 fixed nodes: wall {np.mean([c[2] for c in chosen]):.2f}x, CPU "
          f"{np.mean([c[3] for c in chosen]):.2f}x (mean over the models)")


if __name__ == "__main__":
    main()
