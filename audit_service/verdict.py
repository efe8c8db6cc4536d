"""The verdict: genuine / learned / not_invariant / trivial, with the reasons and the policy.

DESIGN section 4. ``genuine`` must hold on the clean probes, under every shift and on pure noise;
``learned`` means the *predictions* are invariant on in-distribution (clean) probes but the
genuine criteria fail somewhere. Without clean probes learned and not_invariant cannot be told
apart; the label is then ``not_genuine`` and the reasons say so.
"""

from __future__ import annotations

from typing import Iterable

from .spec import DEFAULT_REQUIRE, Policy



def _fmt(value: float | None) -> str:
    return "null" if value is None else f"{value:.4g}"


def genuine_failures(condition: dict, policy: Policy) -> list[tuple[str, float | None, str]]:
    """(metric, value, requirement) for each genuine criterion one condition misses."""
    m = condition["metrics"]
    checks = [
        ("LI_normalized", m["LI_normalized"], policy.genuine_li_normalized_max, "max"),
        ("DI", m["DI"], policy.genuine_di_max, "max"),
        ("agreement", m["agreement"], policy.genuine_agreement_min, "min"),
    ]
    if condition.get("saliency_computed", True):
        checks.append(("SI", m["SI"], policy.genuine_si_min, "min"))
    failures = []
    for metric, value, bound, kind in checks:
        ok = value is not None and (value <= bound if kind == "max" else value >= bound)
        if not ok:
            failures.append((metric, value, f"{'<=' if kind == 'max' else '>='} {bound:g}"))
    return failures


def _failure_reasons(conditions: list[dict], policy: Policy, listed: int = 4) -> list[str]:
    """One line per missed criterion: on how many conditions, and the values of the first few."""
    by_metric: dict[str, tuple[str, list[str]]] = {}
    for c in conditions:
        for metric, value, requirement in genuine_failures(c, policy):
            by_metric.setdefault(metric, (requirement, []))[1].append(f"{c['name']} {_fmt(value)}")
    reasons = []
    for metric, (requirement, where) in by_metric.items():
        shown = ", ".join(where[:listed]) + (f", ... (+{len(where) - listed})" if len(where) > listed else "")
        reasons.append(f"{metric} misses genuine ({requirement}) on {len(where)} of {len(conditions)} "
                       f"conditions: {shown}")
    return reasons


def _is_trivial(conditions: list[dict], policy: Policy) -> list[str]:
    clean = next((c for c in conditions if c["name"] == "clean"), None)
    predictions = (clean or {}).get("predictions") or {}
    if predictions.get("classes_predicted") == 1 and \
            (clean.get("n_probes") or 0) >= policy.trivial_single_class_min_probes:
        return [f"clean: every probe and every orbit element is predicted as class {predictions['majority_class']} "
                f"({clean.get('n_probes')} probes): the decision ignores the input, so agreement 1 is chance, "
                "whatever the logits do"]
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


def _low_sensitivity(conditions: list[dict], policy: Policy) -> list[str]:
    """A model that reacts little to any input looks invariant for the wrong reason: say so."""
    anchor = next((c for c in conditions if c["name"] == "clean"), None) or \
        next((c for c in conditions if c["name"] == "noise"), None)
    variation = anchor["relative_variation"] if anchor else None
    if variation is not None and variation < policy.low_sensitivity_variation:
        return [f"{anchor['name']}: logits vary little across inputs (relative variation {_fmt(variation)} < "
                f"{policy.low_sensitivity_variation:g}); the invariance may come from insensitivity, not symmetry"]
    return []


def _learned_criteria(m: dict, policy: Policy) -> tuple[bool, list[str], str]:
    """(learned holds, the missed requirements, a summary of the clean prediction metrics).

    Chance-corrected criteria apply when the report carries them (``kappa``, ``accuracy_kappa``);
    hand-built summaries without them are judged on agreement and DI alone.
    """
    checks = [
        ("agreement", m.get("agreement"), policy.learned_agreement_min, "min"),
        ("DI", m.get("DI"), policy.learned_di_max, "max"),
    ]
    if "kappa" in m:  # null kappa (one predicted class): agreement cannot be told from chance
        checks.append(("kappa (agreement corrected for its chance level "
                       f"{_fmt(m.get('agreement_chance'))})", m["kappa"], policy.learned_kappa_min, "min"))
    if m.get("accuracy") is not None and "accuracy_kappa" in m:
        checks.append((f"accuracy_kappa (orbit accuracy {_fmt(m['accuracy'])} corrected for the majority-label "
                       f"rate {_fmt(m.get('accuracy_chance'))})", m["accuracy_kappa"],
                       policy.learned_accuracy_kappa_min, "min"))
    misses, parts = [], []
    for name, value, bound, kind in checks:
        ok = value is not None and (value >= bound if kind == "min" else value <= bound)
        requirement = f"{'>=' if kind == 'min' else '<='} {bound:g}"
        parts.append(f"{name} {_fmt(value)} (learned needs {requirement})")
        if not ok:
            misses.append(f"{name} {requirement}, got {_fmt(value)}")
    return not misses, misses, "clean: " + ", ".join(parts)


def gate(label: str | None, require: Iterable[str] | None = None) -> bool | None:
    """The one pass/fail rule: the verdict is one of the ``require`` labels (default ``DEFAULT_REQUIRE``);
    None while there is no verdict. The report, the job status and both CLIs use this."""
    if label is None:
        return None
    return label in (DEFAULT_REQUIRE if require is None else tuple(require))


def decide(conditions: list[dict], policy: Policy, require: Iterable[str] = DEFAULT_REQUIRE) -> dict:
    """Label the model from its per-condition metrics; return {label, reasons, policy, passed, require}."""
    require = list(require)
    trivial = _is_trivial(conditions, policy)
    if trivial:
        label, reasons = "trivial", trivial
    else:
        failures = _failure_reasons(conditions, policy)
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
            holds, misses, summary = _learned_criteria(clean["metrics"], policy)
            if holds:
                label = "learned"
                reasons = [f"predictions are invariant on in-distribution probes: {summary}",
                           "but genuine invariance fails:"] + failures
            else:
                label = "not_invariant"
                reasons = [f"predictions are not invariant beyond chance on in-distribution probes: {summary}"] + \
                    [f"learned needs {miss}" for miss in misses]
    flags = _low_sensitivity(conditions, policy) if label != "trivial" else []
    return {
        "label": label,
        "reasons": reasons + [f"warning: {f}" for f in flags],
        "flags": ["low_sensitivity"] if flags else [],
        "policy": policy.model_dump(),
        "require": require,
        "passed": gate(label, require),
    }
