"""The library's front door: ``run_audit`` turns a model file + spec + probes into a report dict.

spec -> group & shifts -> model runtime -> orbit sweep -> metrics -> verdict -> report.
Everything the client can fix raises an ``AuditError`` subclass naming the field.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import __version__
from .errors import ProbeError
from .groups import Group, build_group
from .guard import guarded as _guarded
from .metrics.saliency import SaliencyMethod, integrated_gradients, occlusion
from .plan import make_plan
from .metrics.sensitivity import finite_difference_jacobian_sketch, jacobian, singular_values
from .names import PER_PROBE_METRICS, ConditionName
from .report.build import condition_report, now_iso, sensitivity_report, with_chance_levels
from .runtime import ModelRunner, load_model
from .runtime.loader import Loader
from .runtime.layout import LayoutChoice, choose_layout, restore
from .runtime.outputs import NOTES as OUTPUT_NOTES
from .runtime.outputs import LogProbabilityRunner, detect_output_kind
from .shifts import ProbeStats, applicable_default_shifts, uniform_noise, validate_shift
from .schedule import run_sweep
from .spec import REPORT_KEYS, SCHEMA_VERSION, AuditSpec, default_shifts
from .sweep import Condition, OrbitSweep
from .progress import ProgressFn
from .symmetrization import symmetrized_summary
from .verdict import decide


#: probes the memory-layout check runs (``runtime.layout``)
LAYOUT_SAMPLE = 8

__all__ = ["run_audit", "load_probe_file", "check_probes", "REPORT_KEYS"]


def run_audit(
    model_path: str | Path,
    spec: AuditSpec,
    probes: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    second_probes: np.ndarray | None = None,
    progress: ProgressFn | None = None,
    load: Loader = load_model,
) -> dict:
    """Audit one model; return the JSON-ready report (keys: ``spec.REPORT_KEYS``).

    Raises ``AuditError`` subclasses (``ModelError``, ``SpecError``, ``ProbeError``,
    ``ModelRuntimeError``) for anything the client can fix. ``load`` (``load_model``'s signature) is where
    the model is loaded: the service passes the cage's, so that the model runs in its own process.
    """
    progress = progress or (lambda fraction, stage: None)
    options = spec.options
    t_start = time.perf_counter()
    progress(0.0, "loading model")
    inputs = _checked_inputs(model_path, spec, probes, labels, second_probes, options.device, load=load)
    runner, x = inputs.runner, inputs.x
    t_loaded = time.perf_counter()

    device = runner.device
    stats = ProbeStats.from_probes(x.to(device)) if x is not None else ProbeStats.default(runner.input_shape, device)
    sample = x[:LAYOUT_SAMPLE].to(device) if x is not None else _noise(LAYOUT_SAMPLE, runner, stats, options.seed)
    layout = choose_layout(runner.torch_module(), runner.input_shape, options.memory_format, sample)
    try:
        report = _sweep_and_report(inputs, spec, stats, layout, progress, t_start, t_loaded)
    finally:
        restore(runner.torch_module(), layout)  # an in-memory module goes back to its caller as it came
    progress(1.0, "done")
    return report


def _sweep_and_report(inputs: CheckedInputs, spec: AuditSpec, stats: ProbeStats, layout: LayoutChoice,
                      progress: ProgressFn, t_start: float, t_loaded: float) -> dict:
    """The sweep, the Jacobian and the report of one loaded model (``run_audit``)."""
    options = spec.options
    runner, x, y, second, group = inputs.runner, inputs.x, inputs.y, inputs.second, inputs.group
    shifts, skipped_shifts, output_kind = inputs.shifts, inputs.skipped_shifts, inputs.output_kind
    device = runner.device
    second_t = second.to(device) if second is not None else None
    saliency, saliency_note = _saliency_method(runner, spec) if options.saliency else (None, None)
    autocast = _check_autocast(runner, group, x, stats, options)
    plan = make_plan(spec, saliency is not None, autocast=bool(autocast and autocast["used"]))
    sweep = OrbitSweep(runner, group, options, stats, saliency, second_t, plan)

    conditions = _conditions(shifts, has_probes=x is not None)
    n_probes = x.shape[0] if x is not None else 0
    total_chunks = sum(sweep.n_chunks(c, n_probes) for c in conditions) + 1
    done = 0

    def tick(name: str) -> Callable[[], None]:
        def on_chunk() -> None:
            nonlocal done
            done += 1
            progress(min(done / total_chunks, 0.99), f"condition {name}")
        progress(min(done / total_chunks, 0.99), f"condition {name}")
        return on_chunk

    outcome = run_sweep(sweep, plan, conditions, x, y, spec, tick)
    results = outcome.results

    progress(min(done / total_chunks, 0.99), "sensitivity")
    t_sens = time.perf_counter()
    if outcome.stopped:
        sensitivity = sensitivity_report(None, "none", "skipped",
                                         note=f"skipped (options.early_stop): {outcome.stopped}")
    else:
        sensitivity = _guarded(lambda: _sensitivity(runner, x, stats, options), "computing the Jacobian")
    t_sens = time.perf_counter() - t_sens

    condition_reports = [with_chance_levels(condition_report(r, options.bootstrap, options.seed, r.saliency_computed,
                                                             outcome.saliency_reasons.get(r.condition.name)),
                                            r.accumulator) for r in results]
    for condition in condition_reports:
        if condition["name"] in outcome.sampling:
            condition["saliency_sampling"] = outcome.sampling[condition["name"]].as_report()
    if group.sampled is not None:
        for condition, r in zip(condition_reports, results):
            condition["group_sample_ci"] = group_sample_ci(r.accumulator)
    verdict = decide(condition_reports, spec.policy, spec.require, spec.require_confident)
    report = {
        "schema_version": SCHEMA_VERSION,
        "service_version": __version__,
        "created_at": now_iso(),
        "model": {**_model_section(runner, saliency, saliency_note), "output_kind": output_kind,
                  "output_note": OUTPUT_NOTES.get(output_kind), "autocast": autocast,
                  "memory_format": layout.as_report()},
        "group": _group_section(group, x if x is not None else _noise(16, runner, stats, options.seed)),
        "conditions": condition_reports,
        "sensitivity": sensitivity,
        "verdict": verdict,
        "saliency_examples": [e for r in results for e in r.examples],
        "spec": spec.model_dump(mode="json"),
        "shifts_skipped": skipped_shifts,
        "saliency": {"scope": outcome.scope, "computed_on": [r.condition.name for r in results if r.saliency_computed],
                     "reason": outcome.scope_reason},
        "early_stop": {"enabled": options.early_stop, "stopped": outcome.stopped is not None,
                       "reason": outcome.stopped, "conditions_skipped": outcome.skipped,
                       "sensitivity_skipped": outcome.stopped is not None},
        "timing": {
            "load_s": round(t_loaded - t_start, 4),
            "conditions_s": {r.condition.name: round(r.seconds, 4) for r in results},
            "saliency_s": {r.condition.name: round(r.saliency_seconds, 4) for r in results},
            "sensitivity_s": round(t_sens, 4),
            "total_s": round(time.perf_counter() - t_start, 4),
            "device": str(device),
        },
    }
    # which reference run the model resembles is attached by whoever serves the report
    # (reference.catalog.attach_reference_profile): the core never reads the reference runs
    report["reference_profile"] = None
    if verdict["label"] not in ("genuine", "trivial"):  # the fix on offer, and what it keeps
        report["symmetrized"] = _guarded(lambda: symmetrized_summary(runner, group, x, y, options.batch_size),
                                         "measuring the symmetrized model")
    return report


def precheck_audit(
    model_path: str | Path,
    spec: AuditSpec,
    probes: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    second_probes: np.ndarray | None = None,
    progress: ProgressFn | None = None,
    load: Loader = load_model,
) -> dict:
    """Everything ``run_audit`` checks before it sweeps, and nothing more: the model loads (on the CPU), the
    probes and labels fit it, the group fits its input shape (axes, sizes, closure and product orders under
    the caps), the shifts apply. The service runs it at submission (an ``engine`` in the sandbox) so that a
    spec that cannot fit the model is a 422 naming the field, never a job that fails later. Returns
    ``format``, ``input_shape``, ``num_classes`` and ``group_order``."""
    checked = _checked_inputs(model_path, spec, probes, labels, second_probes, "cpu", read_outputs=False,
                               load=load)
    runner, group = checked.runner, checked.group
    return {"format": str(getattr(runner, "format", "") or "") or None,
            "input_shape": [int(d) for d in runner.input_shape], "num_classes": runner.num_classes,
            "group_order": len(group.element_names)}


@dataclass
class CheckedInputs:
    """What ``run_audit`` and ``precheck_audit`` know once everything is checked against the model."""

    runner: ModelRunner
    x: torch.Tensor | None
    y: torch.Tensor | None
    second: torch.Tensor | None
    group: Group
    shifts: list
    skipped_shifts: list
    output_kind: str


def _checked_inputs(model_path: str | Path | ModelRunner, spec: AuditSpec, probes: np.ndarray | None,
                    labels: np.ndarray | None, second_probes: np.ndarray | None, device: str,
                    read_outputs: bool = True, load: Loader = load_model) -> CheckedInputs:
    """The runner (outputs adapted: log-probabilities where the model gives probabilities), the probes,
    labels, second probes, the group and the shifts, each checked against the model's input shape."""
    options = spec.options
    hint = tuple(probes.shape[1:]) if isinstance(probes, np.ndarray) and probes.ndim >= 2 else None
    # a runner built by the caller (the Python API's in-memory module) is used as it is
    runner = model_path if isinstance(model_path, ModelRunner) else load(model_path, device=device,
                                                                           input_shape=hint)
    # only the probes the audit uses are checked and converted (a client may send far more)
    if isinstance(probes, np.ndarray) and probes.ndim:
        probes = probes[: options.n_probes]
    x = check_probes(probes, runner.input_shape, "probes") if probes is not None else None
    y = check_labels(labels, x, runner.num_classes) if labels is not None else None
    second = check_probes(second_probes, runner.input_shape, "second_probes") if second_probes is not None else None

    # the submission check (read_outputs=False) runs no forward pass beyond the loader's zero batch
    runner, output_kind = _adapt_outputs(runner, x, options) if read_outputs else (runner, "unread")
    group = build_group(spec.group, runner.input_shape)
    if spec.shifts is None:
        shifts, skipped_shifts = applicable_default_shifts(default_shifts(), runner.input_shape)
    else:
        shifts, skipped_shifts = list(spec.shifts), []
    for i, shift in enumerate(shifts):
        validate_shift(shift, runner.input_shape, has_second_probes=second is not None, field=f"shifts[{i}]")
    return CheckedInputs(runner, x, y, second, group, shifts, skipped_shifts, output_kind)


# --------------------------------------------------------------------------- inputs
def load_probe_file(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read probes from .npy (array) or .npz (``x`` or ``probes``, optional ``y`` or ``labels``).

    Never unpickles: object arrays are refused.
    """
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ProbeError(f"Expected a readable .npy or .npz file, but {path} does not exist", field="probes") from None
    except ValueError as exc:
        raise ProbeError(f"Expected a numeric .npy or .npz array (object arrays are refused), but {path}: {exc}",
                         field="probes") from None
    except Exception as exc:  # noqa: BLE001 - numpy raises many types for corrupt files
        raise ProbeError(f"Expected a .npy or .npz file, but {path} could not be read: {exc}", field="probes") from None
    if isinstance(data, np.ndarray):
        return data, None
    with data:
        keys = set(data.files)
        x_key = next((k for k in ("x", "probes", "X") if k in keys), None)
        if x_key is None:
            raise ProbeError(f"Expected an .npz with an array named 'x' or 'probes', but found {sorted(keys)}",
                             field="probes")
        y_key = next((k for k in ("y", "labels") if k in keys), None)
        return data[x_key], (data[y_key] if y_key else None)


def check_probes(arr: np.ndarray, input_shape: tuple[int, ...], field: str) -> torch.Tensor:
    """Shape (N, *input_shape), a floating dtype, finite values -> float32 tensor on the host."""
    if not isinstance(arr, np.ndarray):
        raise ProbeError(f"Expected a numpy array, but got {type(arr).__name__}", field=field)
    expected = f"(N, {', '.join(map(str, input_shape))})"
    if arr.ndim != len(input_shape) + 1 or tuple(arr.shape[1:]) != tuple(input_shape):
        raise ProbeError(f"Expected an array shaped like the model's input batch {expected}, but got "
                         f"{tuple(arr.shape)}", field=field)
    if arr.shape[0] == 0:
        raise ProbeError(f"Expected at least one probe, but got an empty array {tuple(arr.shape)}", field=field)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ProbeError(f"Expected float32 values (preprocessed as the model expects), but got dtype {arr.dtype}; "
                         "convert with arr.astype(np.float32) after normalising", field=field)
    finite = np.isfinite(arr)
    if not finite.all():
        raise ProbeError(f"Expected finite values, but {int((~finite).sum())} entries are NaN or Inf", field=field)
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def check_labels(arr: np.ndarray, probes: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    if probes is None:
        raise ProbeError("Expected probes to go with the labels, but got labels alone", field="labels")
    arr = np.asarray(arr)
    if arr.ndim != 1 or arr.shape[0] < probes.shape[0]:
        raise ProbeError(f"Expected labels of shape ({probes.shape[0]},), one per probe, but got {tuple(arr.shape)}",
                         field="labels")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ProbeError(f"Expected integer class indices, but got dtype {arr.dtype}", field="labels")
    arr = arr[: probes.shape[0]]
    if arr.min() < 0 or arr.max() >= num_classes:
        raise ProbeError(f"Expected class indices in [0, {num_classes - 1}], but got values in "
                         f"[{arr.min()}, {arr.max()}]", field="labels")
    return torch.from_numpy(arr.astype(np.int64))


# --------------------------------------------------------------------------- pieces
#: the pair metrics whose group average a sampled group estimates (the per-probe rows of ``engine.names``)
SAMPLED_METRICS = tuple(str(m) for m in PER_PROBE_METRICS)


def group_sample_ci(accumulator, z: float = 1.96) -> dict:
    """95% normal intervals for the group averages, from the per-element means of the sampled elements.

    The identity (element 0, always included) is left out of the statistics: the other elements are the
    uniform sample. {metric: {mean, lo, hi, n_elements}}; a metric with no values is null.
    """
    out: dict = {}
    for name in SAMPLED_METRICS:
        means = accumulator.element_means(name)[1:]
        means = means[np.isfinite(means)]
        if means.size < 2:
            out[name] = None
            continue
        centre, half = float(means.mean()), z * float(means.std(ddof=1)) / math.sqrt(means.size)
        out[name] = {"mean": centre, "lo": centre - half, "hi": centre + half, "n_elements": int(means.size)}
    return out


def _adapt_outputs(runner: ModelRunner, x: torch.Tensor | None, options) -> tuple[ModelRunner, str]:
    """Detect probability / log-probability outputs on the probes (or seeded noise); see ``runtime.outputs``."""
    if x is not None:
        sample = x[:64].to(runner.device)
    else:
        stats = ProbeStats.default(runner.input_shape, runner.device)
        sample = _noise(16, runner, stats, options.seed)
    kind = _guarded(lambda: detect_output_kind(runner.logits(sample, options.batch_size)), "reading its outputs")
    return (LogProbabilityRunner(runner) if kind == "probabilities" else runner), kind


#: bf16 autocast is used only when its logits stay this close to fp32 (max |difference| over the logits'
#: scale, on the first clean chunk): well inside what moves LI_normalized / DI at the genuine bounds' scale
#: is not claimed; the check guards the forward metrics of learned / not_invariant models.
AUTOCAST_TOLERANCE = 2e-2


def _check_autocast(runner: ModelRunner, group: Group, x, stats: ProbeStats, options) -> dict | None:
    """The opt-in bf16 autocast, checked against fp32 on the first probes' orbits; not used past
    ``AUTOCAST_TOLERANCE`` (the report says so). None when not asked for. The plan carries the outcome."""
    if not options.autocast_bf16:
        return None
    if runner.device.type != "cuda":
        return {"dtype": None, "used": False, "note": f"autocast_bf16 needs CUDA; ran fp32 on {runner.device}"}
    sample = x[:16].to(runner.device) if x is not None else _noise(16, runner, stats, options.seed)
    flat = group.orbit(sample).reshape(-1, *sample.shape[1:])
    reference = runner.logits(flat, options.batch_size)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = runner.logits(flat, options.batch_size).float()
    scale = float(reference.abs().max().clamp_min(1e-12))
    error = float((low - reference).abs().max()) / scale
    used = error <= AUTOCAST_TOLERANCE
    return {"dtype": "bfloat16" if used else None, "used": used,
            "max_relative_logit_error": error, "tolerance": AUTOCAST_TOLERANCE,
            "note": "forward-only logits under bf16 autocast (saliency and the Jacobian stay fp32)"
            if used else "bf16 logits differ from fp32 past the tolerance: ran fp32"}


def _conditions(shifts: list, has_probes: bool) -> list[Condition]:
    conditions = []
    if has_probes:
        conditions.append(Condition(ConditionName.CLEAN.value, keep_examples=True))
        conditions += [Condition(s.label, shift=s) for s in shifts]
    conditions.append(Condition(ConditionName.NOISE.value, noise=True, keep_examples=True))
    return conditions


def _saliency_method(runner: ModelRunner, spec: AuditSpec) -> tuple[SaliencyMethod, str | None]:
    module = runner.torch_module()
    if module is not None:
        return integrated_gradients(module, spec.options.ig_steps, spec.options.batch_size, adaptive=True), None
    reason = runner.gradient_note or "no differentiable module for this model"
    method = occlusion(lambda t: runner.logits(t, spec.options.batch_size), runner.input_shape, reason)
    return method, method.note


def _sensitivity(runner: ModelRunner, x: torch.Tensor | None, stats: ProbeStats, options) -> dict:
    count = options.jacobian_probes
    if count == 0:
        return sensitivity_report(None, "none", "none")
    if x is not None:
        probes, source = x[:count].to(runner.device), ConditionName.CLEAN.value
    else:
        probes, source = _noise(count, runner, stats, options.seed), ConditionName.NOISE.value
    module = runner.torch_module()
    if module is not None:
        return sensitivity_report(singular_values(jacobian(module, probes)), source, "autograd Jacobian")
    gen = torch.Generator(device=runner.device)
    gen.manual_seed(options.seed)
    sketch = finite_difference_jacobian_sketch(lambda t: runner.logits(t, options.batch_size), probes,
                                               generator=gen)
    return sensitivity_report(singular_values(sketch), source, "finite-difference sketch (64 random directions)",
                              note=f"{runner.gradient_note}; sigma_max is an estimate")


def _model_section(runner: ModelRunner, saliency: SaliencyMethod | None, saliency_note: str | None) -> dict:
    return {
        "format": runner.format,
        "sha256": runner.sha256,
        "input_shape": list(runner.input_shape),
        "num_classes": runner.num_classes,
        "device": str(runner.device),
        "providers": list(runner.providers),
        "saliency_method": saliency.describe() if saliency else None,
        "gradient_path": _gradient_path(runner),
        "twin_max_error": getattr(runner, "twin_error", None),
        "gradient_note": saliency_note or runner.gradient_note,
    }


def _gradient_path(runner: ModelRunner) -> str:
    """How saliency and the Jacobian get their gradients: autograd through which module, or the fallback."""
    if runner.torch_module() is not None:
        return f"autograd: {getattr(runner, 'gradient_path', None) or 'torch module'}"
    return "fallback: gradient-free (occlusion saliency, finite-difference sigma_max)"


def _group_section(group: Group, probes: torch.Tensor) -> dict:
    """The group's description; for a sampled (inexact) group, the measured round-trip error too."""
    section = group.describe()
    if not group.exact:
        section["interpolation_error"] = group.interpolation_error(probes[:16])
    return section


def _noise(count: int, runner: ModelRunner, stats: ProbeStats, seed: int) -> torch.Tensor:
    """Seeded uniform noise on the model's device: the probes used when the client gave none."""
    gen = torch.Generator(device=runner.device)
    gen.manual_seed(seed)
    return uniform_noise(count, runner.input_shape, stats, gen, runner.device)
