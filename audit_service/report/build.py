"""Assemble the JSON report from sweep results: one dict per condition, sensitivity, verdict.

The keys are the contract (``spec.REPORT_KEYS``); values are plain JSON types, and metrics that
are undefined (no labels, zero saliency, no input variation) are ``null`` with a note, never a
made-up number.
"""

from __future__ import annotations

import datetime as _dt
import math

import numpy as np
import torch

from ..metrics import summarize
from ..sweep import ConditionResult


def condition_report(result: ConditionResult, n_bootstrap: int, seed: int, saliency_computed: bool,
                     saliency_reason: str | None = None) -> dict:
    """Metrics (means over probes and group elements) and their spread for one condition.

    ``saliency_reason``: why SI was not computed here (``options.saliency_scope``); it goes into the notes
    and ``saliency_skipped``."""
    acc = result.accumulator
    variation = acc.sample_variation
    notes: list[str] = []
    per_probe = {name: acc.values(name) for name in ("DI", "LI", "SI", "agreement", "accuracy")}
    if variation > 0:
        per_probe["LI_normalized"] = acc.values("sq_dist") / variation
    else:
        per_probe["LI_normalized"] = np.empty(0)
        notes.append("LI_normalized is null: the logits do not vary across probes (sample variation 0)")
    if not per_probe["accuracy"].size:
        notes.append("accuracy is null: no labels for this condition")
    if saliency_computed and acc.si_pairs_undefined:
        notes.append(f"SI is undefined for {acc.si_pairs_undefined} of {acc.si_pairs_total} (x, g) pairs "
                     "because a saliency map is all zero; those pairs are left out of SI")
    if saliency_computed and acc.si_pairs_total and acc.si_pairs_undefined == acc.si_pairs_total:
        notes.append("SI is null: every saliency map is zero (the target logit does not depend on the input)")
    if not saliency_computed:
        saliency_reason = saliency_reason or "saliency was switched off (options.saliency = false)"
        notes.append(f"SI is null: {saliency_reason}")
    spread = {name: summarize(values, n_bootstrap, seed) for name, values in per_probe.items()}
    metrics = {name: (s["mean"] if s else None) for name, s in spread.items()}
    shift = result.condition.shift
    return {
        "name": result.condition.name,
        "shift": shift.model_dump(exclude_none=True) if shift is not None else None,
        "n_probes": acc.n,
        "metrics": {k: metrics[k] for k in ("DI", "LI", "SI", "LI_normalized", "agreement", "accuracy")},
        "spread": spread,
        "sample_variation": finite_or_none(variation),
        "relative_variation": finite_or_none(acc.relative_variation),
        "saliency_computed": saliency_computed,
        "saliency_skipped": None if saliency_computed else saliency_reason,
        "notes": notes,
        "seconds": round(result.seconds, 4),
    }


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN / Inf: undefined values become null."""
    return float(value) if value is not None and math.isfinite(value) else None


def sensitivity_report(singular_values: torch.Tensor | None, probes_from: str, method: str,
                       note: str | None = None, spectrum_length: int = 10) -> dict:
    """sigma_max mean / p5 / p95 over probes and the mean leading spectrum."""
    if singular_values is None or singular_values.numel() == 0:
        return {"sigma_max": None, "spectrum": [], "n_probes": 0, "probes": probes_from, "method": method,
                "note": note or "no probes for the Jacobian (options.jacobian_probes = 0)"}
    sv = singular_values.double().cpu().numpy()
    sigma_max = sv[:, 0]
    p5, p95 = np.percentile(sigma_max, [5, 95])
    out = {
        "sigma_max": {"mean": float(sigma_max.mean()), "p5": float(p5), "p95": float(p95)},
        "spectrum": [float(v) for v in sv.mean(axis=0)[:spectrum_length]],
        "n_probes": int(sv.shape[0]),
        "probes": probes_from,
        "method": method,
    }
    if note:
        out["note"] = note
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

