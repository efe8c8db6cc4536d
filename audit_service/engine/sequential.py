"""Sequential SI: a confidence bound on a condition's SI, read after each probe batch, and the report's record.

The bound holds the verdict's own 95% interval (the bootstrap interval ``summarize`` gives the report, with the
same resamples and seed) and a normal interval at the plan's confidence split over its looks (Bonferroni), and
takes the wider of the two: once it is clear of the genuine SI threshold on either side, more probes could not
move the verdict's interval across it either, so the criterion is decided and the condition stops.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Literal

import numpy as np

from .metrics import summarize

#: why a condition's SI pass stopped (the report's ``saliency_sampling.stopped``): decided (the bound cleared the
#: threshold), not_needed (another criterion already rules genuine out, so one batch with a defined SI is enough),
#: cap (every probe)
Stopped = Literal["decided", "not_needed", "cap"]


def si_bound(
    values: np.ndarray, confidence: float, looks: int, n_bootstrap: int, seed: int
) -> tuple[float, float] | None:
    """(lo, hi) around the mean of the finite per-probe SI values; None when there are none."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return None
    mean = float(finite.mean())
    se = float(finite.std(ddof=1) / math.sqrt(finite.size)) if finite.size > 1 else 0.0
    z = NormalDist().inv_cdf(1.0 - (1.0 - confidence) / (2.0 * max(1, looks)))
    lo, hi = mean - z * se, mean + z * se
    ci = (summarize(finite, n_bootstrap, seed) or {}).get("ci95")
    if ci and ci[1] > ci[0]:  # the interval the verdict reads (``verdict._interval``)
        lo, hi = min(lo, ci[0]), max(hi, ci[1])
    return lo, hi


def decided(bound: tuple[float, float] | None, threshold: float) -> bool:
    """The bound lies wholly on one side of a ``min`` threshold (value >= threshold passes)."""
    if bound is None:
        return False
    lo, hi = bound
    return lo >= threshold or hi < threshold


def relative_completeness(sums: tuple[float, float]) -> float | None:
    """The relative completeness error from ``ConditionResult.completeness`` sums; None when nothing was checked."""
    error, scale = sums
    return float(error / scale) if scale > 0 else None
