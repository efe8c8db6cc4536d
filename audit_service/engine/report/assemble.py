"""The whole report of one audit, assembled from what the audit measured: the model and group sections, one
dict per condition (``report.build``), the sensitivity, the verdict, the saliency examples, the plan's choices
and the timing. The keys are ``spec.REPORT_KEYS``; the typed models (``engine.schema``) read it key for key.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from ... import __version__
from ..groups import Group
from ..inputs import CheckedInputs
from ..metrics.sensitivity import finite_difference_jacobian_sketch, jacobian, singular_values
from ..names import ConditionName
from ..plan import AuditPlan
from ..runtime import ModelRunner
from ..schema import Condition
from ..runtime.layout import LayoutChoice
from ..runtime.outputs import NOTES as OUTPUT_NOTES
from ..spec import SCHEMA_VERSION, AuditSpec, Options
from ..sweep import SweepOutcome
from ..verdict import Z95, decide
from .build import PER_PROBE_NAMES, condition_report, now_iso, sensitivity_report
from .examples import saliency_examples

#: probes the group section measures a sampled group's interpolation error on
GROUP_SAMPLE = 16


@dataclass(frozen=True)
class Timing:
    """When the audit started and its model was loaded (``time.perf_counter``), and the Jacobian's seconds."""

    started: float
    loaded: float
    sensitivity_s: float


def assemble_report(
    spec: AuditSpec,
    inputs: CheckedInputs,
    plan: AuditPlan,
    outcome: SweepOutcome,
    sensitivity: dict,
    layout: LayoutChoice,
    timing: Timing,
) -> dict:
    """The report dict (without ``symmetrized``, which the audit adds for a model that is not genuine)."""
    options, runner, group, results = spec.options, inputs.runner, inputs.group, outcome.results
    condition_reports = [
        condition_report(
            r, options.bootstrap, options.seed, r.saliency_computed, outcome.saliency_reasons.get(r.condition.name)
        )
        for r in results
    ]
    for condition in condition_reports:
        if condition["name"] in outcome.sampling:
            condition["saliency_sampling"] = outcome.sampling[condition["name"]].to_json()
    if group.sampled is not None:
        for condition, r in zip(condition_reports, results):
            condition["group_sample_ci"] = group_sample_ci(r.accumulator)
    verdict = decide(
        [Condition.model_validate(c) for c in condition_reports], spec.policy, spec.require, spec.require_confident
    )
    return {
        "schema_version": SCHEMA_VERSION,
        "service_version": __version__,
        "created_at": now_iso(),
        "model": {
            **model_section(runner, plan),
            "output_kind": inputs.output_kind,
            "output_note": OUTPUT_NOTES.get(inputs.output_kind),
            "autocast": plan.autocast_check,
            "memory_format": layout.as_report(),
        },
        "group": group_section(group, inputs.x[:GROUP_SAMPLE] if inputs.x is not None else inputs.sample(GROUP_SAMPLE)),
        "conditions": condition_reports,
        "sensitivity": sensitivity,
        "verdict": verdict.to_json(),
        "saliency_examples": saliency_examples(results, group.element_names),
        "spec": spec.model_dump(mode="json"),
        "shifts_skipped": inputs.skipped_shifts,
        "saliency": {
            "scope": outcome.scope,
            "computed_on": [r.condition.name for r in results if r.saliency_computed],
            "reason": outcome.scope_reason,
        },
        "early_stop": {
            "enabled": options.early_stop,
            "stopped": outcome.stopped is not None,
            "reason": outcome.stopped,
            "conditions_skipped": outcome.skipped,
            "sensitivity_skipped": outcome.stopped is not None,
        },
        "timing": {
            "load_s": round(timing.loaded - timing.started, 4),
            "conditions_s": {r.condition.name: round(r.seconds, 4) for r in results},
            "saliency_s": {r.condition.name: round(r.saliency_seconds, 4) for r in results},
            "sensitivity_s": round(timing.sensitivity_s, 4),
            "total_s": round(time.perf_counter() - timing.started, 4),
            "device": str(runner.device),
        },
        # which reference run the model resembles is attached by whoever serves the report
        # (reference.catalog.closest_reference_profile): the core never reads the reference runs
        "reference_profile": None,
    }


def sensitivity_section(inputs: CheckedInputs, options: Options, stopped: str | None) -> dict:
    """sigma_max of the Jacobian on the first ``options.jacobian_probes`` probes (or seeded noise): autograd
    through the torch module, else a finite-difference sketch; skipped when early stopping ended the sweep."""
    if stopped:
        return sensitivity_report(None, "none", "skipped", note=f"skipped (options.early_stop): {stopped}")
    count, runner = options.jacobian_probes, inputs.runner
    if count == 0:
        return sensitivity_report(None, "none", "none")
    probes = inputs.sample(count)
    source = (ConditionName.CLEAN if inputs.x is not None else ConditionName.NOISE).value
    module = runner.torch_module()
    if module is not None:
        return sensitivity_report(singular_values(jacobian(module, probes)), source, "autograd Jacobian")
    gen = torch.Generator(device=runner.device)
    gen.manual_seed(options.seed)
    sketch = finite_difference_jacobian_sketch(lambda t: runner.logits(t, options.batch_size), probes, generator=gen)
    return sensitivity_report(
        singular_values(sketch),
        source,
        "finite-difference sketch (64 random directions)",
        note=f"{runner.gradient_note}; sigma_max is an estimate",
    )


def group_sample_ci(accumulator, z: float = Z95) -> dict:
    """95% normal intervals for the group averages, from the per-element means of the sampled elements.

    The identity (element 0, always included) is left out of the statistics: the other elements are the
    uniform sample. {metric: {mean, lo, hi, n_elements}}; a metric with no values is null.
    """
    out: dict = {}
    for name in PER_PROBE_NAMES:
        means = accumulator.element_means(name)[1:]
        means = means[np.isfinite(means)]
        if means.size < 2:
            out[name] = None
            continue
        centre, half = float(means.mean()), z * float(means.std(ddof=1)) / math.sqrt(means.size)
        out[name] = {"mean": centre, "lo": centre - half, "hi": centre + half, "n_elements": int(means.size)}
    return out


def model_section(runner: ModelRunner, plan: AuditPlan) -> dict:
    """What was audited and how its gradients were had (the saliency method's note says why not autograd)."""
    saliency = plan.saliency
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
        "gradient_note": (saliency.note if saliency else None) or runner.gradient_note,
    }


def _gradient_path(runner: ModelRunner) -> str:
    """How saliency and the Jacobian get their gradients: autograd through which module, or the fallback."""
    if runner.torch_module() is not None:
        return f"autograd: {getattr(runner, 'gradient_path', None) or 'torch module'}"
    return "fallback: gradient-free (occlusion saliency, finite-difference sigma_max)"


def group_section(group: Group, probes: torch.Tensor) -> dict:
    """The group's description; for a sampled (inexact) group, the measured round-trip error too."""
    section = group.describe()
    if not group.exact:
        section["interpolation_error"] = group.interpolation_error(probes)
    return section
