"""The audit plan: what the sweep does, decided once before it starts, as one immutable value.

Where SI is computed (``options.saliency_scope``), whether SI is sampled sequentially with a confidence bound
(``sequential``), whether the shifts may be skipped once clean and noise settle the label (``options.early_stop``)
and whether forward-only logits run under bf16 autocast (checked against fp32 first) are fixed here; the sweep
reads the plan and never gets switched from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .spec import AuditSpec

#: the confidence of the sequential SI bound over all its looks (Bonferroni across the batches)
SI_CONFIDENCE = 0.95
#: at most this many looks at SI per condition: the batch is ``ceil(cap / SI_LOOKS)`` probes, at least
#: ``SI_MIN_BATCH``, so a genuine model (SI 1 with no spread) pays for a quarter of its probes
SI_LOOKS = 4
SI_MIN_BATCH = 16


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
    #: forward-only logits under bf16 autocast (CUDA, checked against fp32 by the audit)
    autocast: bool

    def si_batch(self, cap: int) -> int:
        """Probes per SI batch for a condition of ``cap`` probes (all of them when not sequential)."""
        if not self.sequential:
            return cap
        return max(1, min(cap, max(SI_MIN_BATCH, math.ceil(cap / SI_LOOKS))))

    def looks(self, cap: int) -> int:
        """How many times the bound may be read on a condition of ``cap`` probes."""
        return math.ceil(cap / self.si_batch(cap)) if cap else 1


def make_plan(spec: AuditSpec, has_saliency: bool, autocast: bool = False) -> AuditPlan:
    """The plan of one audit; ``has_saliency``: a saliency method exists for the model."""
    options = spec.options
    scope = options.saliency_scope if options.saliency and has_saliency else "none"
    return AuditPlan(scope=scope, sequential=scope == "decisive", confidence=SI_CONFIDENCE,
                     si_threshold=spec.policy.genuine_si_min, early_stop=options.early_stop, autocast=autocast)
