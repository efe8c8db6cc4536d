"""The verdict: genuine / learned / not_invariant / trivial, with the reasons and the policy.

DESIGN section 4. ``genuine`` must hold on the clean probes, under every shift and on pure noise;
``learned`` means the *predictions* are invariant on in-distribution (clean) probes but the
genuine criteria fail somewhere. Without clean probes learned and not_invariant cannot be told
apart; the label is then ``not_genuine`` and the reasons say so.
"""

from __future__ import annotations

import math
from typing import Iterable

from .spec import Policy

LABELS = ("genuine", "learned", "not_invariant", "trivial", "not_genuine")
DEFAULT_REQUIRE = ("genuine", "learned")


def _fmt(value: float | None) -> str:
    return "null" if value is None else f"{value:.4g}"


def genuine_failures(condition: dict, policy: Policy) -> list[str]:
    """Why one condition falls short of genuine invariance (empty when it meets every criterion)."""
    name, m = condition["name"], condition["metrics"]
    failures = []
    if m["LI_normalized"] is None or m["LI_normalized"] > policy.genuine_li_normalized_max:
        failures.append(f"{name}: LI_normalized {_fmt(m['LI_normalized'])} > {policy.genuine_li_normalized_max:g}")
    if m["DI"] > policy.genuine_di_max:
        failures.append(f"{name}: DI {_fmt(m['DI'])} > {policy.genuine_di_max:g}")
    if m["agreement"] < policy.genuine_agreement_min:
        failures.append(f"{name}: agreement {_fmt(m['agreement'])} < {policy.genuine_agreement_min:g}")
    if condition.get("saliency_computed", True):
        if m["SI"] is None:
            failures.append(f"{name}: SI undefined (all saliency maps zero)")
        elif m["SI"] < policy.genuine_si_min:
            failures.append(f"{name}: SI {_fmt(m['SI'])} < {policy.genuine_si_min:g}")
    return failures


def _is_trivial(conditions: list[dict], policy: Policy) -> list[str]:
    anchors = [c for c in conditions if c["name"] in ("clean", "noise")]
    variations = [c["relative_variation"] for c in anchors if c["relative_variation"] is not None]
    if variations and all(v <= policy.trivial_variation_max for v in variations):
        return [f"{c['name']}: logits barely vary across inputs (relative variation "
                f"{_fmt(c['relative_variation'])} <= {policy.trivial_variation_max:g}); the model ignores its input"
                for c in anchors]
    computed = [c for c in conditions if c.get("saliency_computed", True)]
    if computed and all(c["metrics"]["SI"] is None for c in computed):
        return ["every saliency map is zero: the target logit does not depend on the input"]
    return []


def decide(conditions: list[dict], policy: Policy, require: Iterable[str] = DEFAULT_REQUIRE) -> dict:
    """Label the model from its per-condition metrics; return {label, reasons, policy, passed, require}."""
    require = list(require)
    trivial = _is_trivial(conditions, policy)
    if trivial:
        label, reasons = "trivial", trivial
    else:
        failures = [f for c in conditions for f in genuine_failures(c, policy)]
        clean = next((c for c in conditions if c["name"] == "clean"), None)
        if not failures:
            label = "genuine"
            reasons = [f"invariant within tolerance on all {len(conditions)} conditions "
                       f"({', '.join(c['name'] for c in conditions)})"]
        elif clean is None:
            label = "not_genuine"
            reasons = failures + ["no in-distribution probes were given, so learned and not_invariant "
                                  "cannot be separated: pass --probes to decide"]
        else:
            m = clean["metrics"]
            predictions_hold = (m["agreement"] >= policy.learned_agreement_min
                                and m["DI"] <= policy.learned_di_max)
            summary = (f"clean: agreement {_fmt(m['agreement'])} (learned needs >= {policy.learned_agreement_min:g}), "
                       f"DI {_fmt(m['DI'])} (learned needs <= {policy.learned_di_max:g})")
            if predictions_hold:
                label = "learned"
                reasons = [f"predictions are invariant on in-distribution probes: {summary}",
                           "but the genuine criteria fail:"] + failures
            else:
                label = "not_invariant"
                reasons = [f"predictions change across the orbit on in-distribution probes: {summary}"]
    return {
        "label": label,
        "reasons": reasons,
        "policy": policy.model_dump(),
        "require": require,
        "passed": label in require,
    }


def finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None
