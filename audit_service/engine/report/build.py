"""Assemble the JSON report from sweep results: one dict per condition, sensitivity, verdict.

The shape is the contract, typed in ``engine.schema`` (``Report.model_validate`` reads what this writes, key
for key); values are plain JSON types, and metrics that are undefined (no labels, zero saliency, no input
variation) are ``null`` with a note, never a made-up number.
"""

from __future__ import annotations

import datetime as _dt
import math

import numpy as np
import torch

from ..metrics import chance_corrected, summarize
from ..names import PER_PROBE_METRICS, SPREAD_METRICS
from ..sweep import ConditionResult


#: the pair metrics of a condition, in report order (LI_normalized is derived from the squared distances): the
#: table's rows with a spread (``engine.names``)
CONDITION_METRICS = tuple(str(m) for m in SPREAD_METRICS)
#: the ones the accumulator keeps per probe (and whose group average a sampled group estimates)
PER_PROBE_NAMES = tuple(str(m) for m in PER_PROBE_METRICS)


def condition_report(
    result: ConditionResult, n_bootstrap: int, seed: int, saliency_computed: bool, saliency_reason: str | None = None
) -> dict:
    """Metrics and their spread for one condition, with the chance levels and predicted classes
    (``_with_chance_levels``).

    ``metrics`` / ``spread``: means over probes and the non-identity group elements g != e, which every verdict
    criterion uses (``accuracy`` is over the whole orbit, g = e included: it is not an invariance measure).
    ``paper_metrics`` / ``paper_spread``: the paper's identity-inclusive means over all of G (Moskalev et al.
    2023, eqs. 1-3), which its Table 1 reports. ``saliency_reason``: why SI was not computed here
    (``options.saliency_scope``); it goes into the notes and ``saliency_skipped``."""
    acc = result.accumulator
    variation = acc.sample_variation
    notes: list[str] = []
    if variation <= 0:
        notes.append("LI_normalized is null: the logits do not vary across probes (sample variation 0)")
    if not acc.values("accuracy").size:
        notes.append("accuracy is null: no labels for this condition")
    if saliency_computed and acc.si_pairs_undefined:
        notes.append(
            f"SI is undefined for {acc.si_pairs_undefined} of {acc.si_pairs_total} (x, g) pairs "
            "because a saliency map is all zero; those pairs are left out of SI"
        )
    if saliency_computed and acc.si_pairs_total and acc.si_pairs_undefined == acc.si_pairs_total:
        notes.append("SI is null: every saliency map is zero (the target logit does not depend on the input)")
    if not saliency_computed:
        saliency_reason = saliency_reason or "saliency was switched off (options.saliency = false)"
        notes.append(f"SI is null: {saliency_reason}")
    spread = _spreads(acc, variation, identity=False, n_bootstrap=n_bootstrap, seed=seed)
    paper_spread = _spreads(acc, variation, identity=True, n_bootstrap=n_bootstrap, seed=seed)
    shift = result.condition.shift
    condition = {
        "name": result.condition.name,
        "shift": shift.model_dump(exclude_none=True) if shift is not None else None,
        "n_probes": acc.n,
        "metrics": {k: (spread[k] or {}).get("mean") for k in CONDITION_METRICS},
        "spread": spread,
        "paper_metrics": {k: (paper_spread[k] or {}).get("mean") for k in CONDITION_METRICS},
        "paper_spread": paper_spread,
        "sample_variation": finite_or_none(variation),
        "relative_variation": finite_or_none(acc.relative_variation),
        "relative_spread": finite_or_none(acc.relative_spread),
        "saliency_computed": saliency_computed,
        "saliency_skipped": None if saliency_computed else saliency_reason,
        "notes": notes,
        "seconds": round(result.seconds, 4),
    }
    return _with_chance_levels(condition, acc)


def _spreads(acc, variation: float, identity: bool, n_bootstrap: int, seed: int) -> dict:
    """{metric: summarize(per-probe values)} over all of G (``identity``) or over g != e; accuracy is always
    over the whole orbit."""
    per_probe = {name: acc.values(name, identity=identity or name == "accuracy") for name in PER_PROBE_NAMES}
    per_probe["LI_normalized"] = acc.values("sq_dist", identity=identity) / variation if variation > 0 else np.empty(0)
    return {name: summarize(per_probe[name], n_bootstrap, seed) for name in CONDITION_METRICS}


def _with_chance_levels(condition: dict, accumulator) -> dict:
    """Add the chance levels beside agreement and accuracy, and the predicted-class summary.

    ``metrics.agreement_chance`` (from the predicted-class frequencies at x and on g x, g != e), ``metrics.kappa``
    (Cohen's chance-corrected agreement; null for a single predicted class), ``metrics.accuracy_chance`` (the
    majority-label rate) and ``metrics.accuracy_kappa`` (orbit accuracy corrected for it); the paper's
    identity-inclusive ``paper_metrics.agreement_chance`` / ``kappa``; and ``predictions`` {classes_predicted,
    majority_class, majority_fraction}.
    """
    summary = accumulator.prediction_summary()
    for key, chance in (
        ("metrics", summary["agreement_chance_non_identity"]),
        ("paper_metrics", summary["agreement_chance"]),
    ):
        m = condition.get(key)
        if m is None:
            continue
        m["agreement_chance"] = chance
        m["kappa"] = chance_corrected(m.get("agreement"), chance)
        m["accuracy_chance"] = summary["accuracy_chance"]
        m["accuracy_kappa"] = chance_corrected(m.get("accuracy"), summary["accuracy_chance"])
    condition["predictions"] = {k: summary[k] for k in ("classes_predicted", "majority_class", "majority_fraction")}
    if summary["classes_predicted"] == 1:
        condition.setdefault("notes", []).append(
            f"every probe and orbit element is predicted as class {summary['majority_class']}: agreement is 1 by "
            "chance and kappa is null"
        )
    return condition


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN / Inf: undefined values become null."""
    return float(value) if value is not None and math.isfinite(value) else None


def sensitivity_report(
    singular_values: torch.Tensor | None,
    probes_from: str,
    method: str,
    note: str | None = None,
    spectrum_length: int = 10,
) -> dict:
    """sigma_max mean / p5 / p95 over probes and the mean leading spectrum."""
    if singular_values is None or singular_values.numel() == 0:
        return {
            "sigma_max": None,
            "spectrum": [],
            "n_probes": 0,
            "probes": probes_from,
            "method": method,
            "note": note or "no probes for the Jacobian (options.jacobian_probes = 0)",
        }
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
