"""The audit plan: what the sweep does, decided once before it starts, as one immutable value.

Where SI is computed (``options.saliency_scope``) and with which method (integrated gradients through the torch
module, else occlusion), whether SI is sampled sequentially with a confidence bound (``sequential``), whether the
shifts may be skipped once clean and noise settle the label (``options.early_stop``) and whether forward-only
logits run under bf16 autocast (checked against fp32 first) are fixed here; the sweep reads the plan and never
gets switched from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .inputs import CheckedInputs
from .metrics.saliency import SaliencyMethod, integrated_gradients, occlusion
from .runtime import ModelRunner
from .spec import AuditSpec

#: the confidence of the sequential SI bound over all its looks (Bonferroni across the batches)
SI_CONFIDENCE = 0.95
#: at most this many looks at SI per condition: the batch is ``ceil(cap / SI_LOOKS)`` probes, at least
#: ``SI_MIN_BATCH``, so a genuine model (SI 1 with no spread) pays for a quarter of its probes
SI_LOOKS = 4
SI_MIN_BATCH = 16
#: bf16 autocast is used only when its logits stay this close to fp32 (max |difference| over the logits'
#: scale, on the orbits of the first AUTOCAST_SAMPLE probes): well inside what moves LI_normalized / DI at
#: the genuine bounds' scale is not claimed; the check guards the forward metrics of learned / not_invariant
#: models.
AUTOCAST_TOLERANCE = 2e-2
#: probes the autocast check compares on
AUTOCAST_SAMPLE = 16


@dataclass(frozen=True)
class AuditPlan:
    """How one audit sweeps; built by ``make_plan`` from the spec and what the model allows."""

    #: decisive | all | none: where SI is computed (``none`` also when there is no saliency method)
    scope: str
    #: SI in probe batches, stopped once a confidence bound decides its criterion (the ``decisive`` scope)
    sequential: bool
    #: the overall confidence of that bound
    confidence: float
    #: the genuine SI threshold the bound is held against (``policy.genuine_si_min``)
    si_threshold: float
    #: skip the shifts and the Jacobian once clean and noise settle the label
    early_stop: bool
    #: how saliency maps are computed (None: ``options.saliency`` is off)
    saliency: SaliencyMethod | None = None
    #: the report's ``model.autocast``: what the check measured (None: not asked for)
    autocast_check: dict | None = None

    @property
    def autocast(self) -> bool:
        """Forward-only logits under bf16 autocast: asked for, on CUDA, and within tolerance of fp32 (the check)."""
        return bool(self.autocast_check and self.autocast_check["used"])

    def si_batch(self, cap: int) -> int:
        """Probes per SI batch for a condition of ``cap`` probes (all of them when not sequential)."""
        if not self.sequential:
            return cap
        return max(1, min(cap, max(SI_MIN_BATCH, math.ceil(cap / SI_LOOKS))))

    def looks(self, cap: int) -> int:
        """How many times the bound may be read on a condition of ``cap`` probes."""
        return math.ceil(cap / self.si_batch(cap)) if cap else 1


def make_plan(spec: AuditSpec, saliency: SaliencyMethod | None = None, autocast_check: dict | None = None) -> AuditPlan:
    """The plan of one audit from the spec, the saliency method (None: none for this model, or switched off)
    and the autocast check's outcome."""
    options = spec.options
    scope = options.saliency_scope if options.saliency and saliency is not None else "none"
    return AuditPlan(
        scope=scope,
        sequential=scope == "decisive",
        confidence=SI_CONFIDENCE,
        si_threshold=spec.policy.genuine_si_min,
        early_stop=options.early_stop,
        saliency=saliency,
        autocast_check=autocast_check,
    )


def plan_audit(spec: AuditSpec, inputs: CheckedInputs) -> AuditPlan:
    """The plan for this model: its saliency method and, when asked for, bf16 autocast checked against fp32 on
    the orbits of the first probes (or seeded noise)."""
    saliency = saliency_method(inputs.runner, spec) if spec.options.saliency else None
    return make_plan(spec, saliency, check_autocast(inputs, spec))


def saliency_method(runner: ModelRunner, spec: AuditSpec) -> SaliencyMethod:
    """Integrated gradients through the model's torch module, else occlusion (its ``note`` says why)."""
    module = runner.torch_module()
    if module is not None:
        return integrated_gradients(module, spec.options.ig_steps, spec.options.batch_size, adaptive=True)
    reason = runner.gradient_note or "no differentiable module for this model"
    return occlusion(lambda t: runner.logits(t, spec.options.batch_size), runner.input_shape, reason)


def check_autocast(inputs: CheckedInputs, spec: AuditSpec) -> dict | None:
    """The opt-in bf16 autocast, checked against fp32 on the orbits of the first ``AUTOCAST_SAMPLE`` probes (or
    seeded noise); not used past ``AUTOCAST_TOLERANCE`` (the report says so). None when not asked for."""
    options, runner = spec.options, inputs.runner
    if not options.autocast_bf16:
        return None
    if runner.device.type != "cuda":
        return {"dtype": None, "used": False, "note": f"autocast_bf16 needs CUDA; ran fp32 on {runner.device}"}
    sample = inputs.sample(AUTOCAST_SAMPLE)
    flat = inputs.group.orbit(sample).reshape(-1, *sample.shape[1:])
    reference = runner.logits(flat, options.batch_size)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = runner.logits(flat, options.batch_size).float()
    scale = float(reference.abs().max().clamp_min(1e-12))
    error = float((low - reference).abs().max()) / scale
    used = error <= AUTOCAST_TOLERANCE
    return {
        "dtype": "bfloat16" if used else None,
        "used": used,
        "max_relative_logit_error": error,
        "tolerance": AUTOCAST_TOLERANCE,
        "note": "forward-only logits under bf16 autocast (saliency and the Jacobian stay fp32)"
        if used
        else "bf16 logits differ from fp32 past the tolerance: ran fp32",
    }
