"""The verdict: genuine / learned / incidental / undecided / not_invariant / trivial / not_genuine.

DESIGN section 4, policy version 3 (docs/audit.md, "The verdict"). The conditions are the report's typed
``schema.Condition``; every criterion is read from a condition's ``metrics``, which are means over the
non-identity group elements g != e (``report.build.condition_report``), so a threshold means the same for
``flip``, C4 and a sampled S_16.

* ``trivial``: the decision ignores the input (logit spread across probes at float rounding relative to the
  logits' own size, every saliency map zero, or one predicted class everywhere).
* ``genuine``: the genuine criteria hold on the clean probes, under every shift and on pure noise.
* ``not_genuine``: genuine fails and there are no clean probes: nothing more can be decided.
* ``not_invariant``: the predictions change across the orbit already on the clean probes (or do not beat chance).
* The predictions are invariant on the clean probes, genuine fails; then whether the invariance was *learned*:
  ``learned`` when the labels show that the model learned the task (orbit accuracy clearly above the majority-label
  rate); ``incidental`` when the labels show it did not (a random network with global pooling is nearly
  flip-invariant by accident); ``undecided`` without labels, which cannot tell the two apart (untrained networks'
  invariance also degrades off the data). Only ``genuine`` and ``learned`` pass the default gate.

Each criterion carries its confidence interval; one that straddles its threshold where it decides the label makes
the verdict ``borderline`` (with the probes that would settle it), and ``require_confident`` (``--strict``) fails
a borderline verdict at the gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

from .names import METRICS, ConditionName, Metric
from .schema import Condition, CriterionRole, Miss, Reason, ReasonTopic, Verdict, find_condition
from .spec import DEFAULT_REQUIRE, Policy

#: z of a two-sided 95% normal interval, used when a spread has no bootstrap interval
Z95 = 1.96
#: more probes than this never settle a criterion in practice: reported as unsettleable
MAX_PROBES_TO_SETTLE = 1_000_000


def _fmt(value: float | None) -> str:
    return "null" if value is None else f"{value:.4g}"


# --------------------------------------------------------------------------- reasons as data
def _said(
    topic: ReasonTopic, headline: str, detail: str | None = None, sep: str = ": ", prefix: str = "", **data: Any
) -> Reason:
    """A reason whose sentence is ``prefix + headline + sep + detail``."""
    text = prefix + headline + (f"{sep}{detail}" if detail is not None else "")
    return Reason(text=text, topic=topic, headline=headline, detail=detail, **data)


# --------------------------------------------------------------------------- criteria
@dataclass(frozen=True)
class Check:
    """One criterion on one condition: its value, threshold, 95% interval and outcome."""

    criterion: Metric  #: LI_normalized, DI, SI, agreement, kappa or accuracy_kappa
    condition: str
    value: float | None
    threshold: float
    kind: Literal["min", "max"]  #: "min": value >= threshold passes; "max": value <= threshold passes
    role: CriterionRole
    interval: tuple[float, float] | None = None
    n: int | None = None  #: probes behind the interval

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        return self.value >= self.threshold if self.kind == "min" else self.value <= self.threshold

    @property
    def straddles(self) -> bool:
        """The 95% interval holds values on both sides of the threshold: more probes could flip the outcome."""
        if self.interval is None or self.value is None:
            return False
        lo, hi = self.interval
        if self.kind == "min":
            return lo < self.threshold <= hi
        return lo <= self.threshold < hi

    @property
    def requirement(self) -> str:
        return f"{'>=' if self.kind == 'min' else '<='} {self.threshold:g}"

    def probes_to_settle(self) -> int | None:
        """Probes at which the interval would no longer reach the threshold, at this estimate (the half-width
        shrinks as 1/sqrt(n)); None when the estimate sits on the threshold or nothing is known of the spread."""
        if not self.straddles or not self.n or self.interval is None or self.value is None:
            return None
        lo, hi = self.interval
        gap = abs(self.value - self.threshold)
        half = (hi - self.value) if self.threshold > self.value else (self.value - lo)
        if gap <= 0 or half <= 0:
            return None
        needed = math.ceil(self.n * (half / gap) ** 2 - 1e-9)
        return needed if needed <= MAX_PROBES_TO_SETTLE else None

    def option(self) -> str:
        return "n_noise_probes" if self.condition == ConditionName.NOISE else "n_probes"

    def as_dict(self) -> dict:
        return {
            "criterion": str(self.criterion),
            "condition": self.condition,
            "value": self.value,
            "threshold": self.threshold,
            "kind": self.kind,
            "role": self.role,
            "interval": list(self.interval) if self.interval is not None else None,
            "n_probes": self.n,
            "passed": self.passed,
            "straddles": self.straddles,
            "probes_to_settle": self.probes_to_settle(),
            "option": self.option(),
        }

    def describe(self) -> str:
        interval = f" [{_fmt(self.interval[0])}, {_fmt(self.interval[1])}]" if self.interval else ""
        return f"{self.condition} {self.criterion} {_fmt(self.value)}{interval}"


def _interval(condition: Condition, metric: Metric) -> tuple[tuple[float, float] | None, int | None]:
    """The 95% interval of a metric's mean: the bootstrap interval, else mean +- 1.96 standard errors."""
    s = condition.spread.get(metric)
    if s is None:
        return None, None
    ci = s.ci95
    if len(ci) == 2 and ci[1] > ci[0]:
        return (float(ci[0]), float(ci[1])), s.n
    if s.se:
        return (s.mean - Z95 * s.se, s.mean + Z95 * s.se), s.n
    return (float(s.mean), float(s.mean)), s.n


def _check(condition: Condition, metric: Metric, threshold: float, role: CriterionRole) -> Check:
    """``metric`` against ``threshold``: a max where low is good, a min where high is good (``METRICS``)."""
    interval, n = _interval(condition, metric)
    return Check(metric, condition.name, condition.metric(metric), threshold, METRICS[metric].kind, role, interval, n)


def _chance_check(
    condition: Condition, metric: Metric, base: Metric, chance_key: Metric, threshold: float, role: CriterionRole
) -> Check:
    """kappa / accuracy_kappa, with the interval of the observed rate mapped through (x - chance) / (1 - chance)
    (the chance level is taken as known)."""
    chance = condition.metric(chance_key)
    observed, n = _interval(condition, base)
    interval = None
    if observed is not None and chance is not None and chance < 1.0 - 1e-12:
        lo, hi = observed
        interval = ((lo - chance) / (1.0 - chance), (hi - chance) / (1.0 - chance))
    return Check(metric, condition.name, condition.metric(metric), threshold, METRICS[metric].kind, role, interval, n)


def genuine_checks(condition: Condition, policy: Policy) -> list[Check]:
    """The genuine criteria of one condition (SI only where it was computed)."""
    checks = [
        _check(condition, Metric.LI_NORMALIZED, policy.genuine_li_normalized_max, "genuine"),
        _check(condition, Metric.DI, policy.genuine_di_max, "genuine"),
        _check(condition, Metric.AGREEMENT, policy.genuine_agreement_min, "genuine"),
    ]
    if condition.saliency_computed:
        checks.append(_check(condition, Metric.SI, policy.genuine_si_min, "genuine"))
    return checks


def genuine_failures(condition: Condition, policy: Policy) -> list[tuple[Metric, float | None, str]]:
    """(metric, value, requirement) for each genuine criterion one condition misses."""
    return [(c.criterion, c.value, c.requirement) for c in genuine_checks(condition, policy) if not c.passed]


def prediction_checks(clean: Condition, policy: Policy) -> list[Check]:
    """Invariant predictions on the clean probes: agreement, DI and, where the report has it, kappa."""
    checks = [
        _check(clean, Metric.AGREEMENT, policy.learned_agreement_min, "invariant_predictions"),
        _check(clean, Metric.DI, policy.learned_di_max, "invariant_predictions"),
    ]
    if Metric.KAPPA in clean.metrics:  # null kappa (one predicted class): agreement cannot be told from chance
        checks.append(
            _chance_check(
                clean,
                Metric.KAPPA,
                Metric.AGREEMENT,
                Metric.AGREEMENT_CHANCE,
                policy.learned_kappa_min,
                "invariant_predictions",
            )
        )
    return checks


def task_check(clean: Condition, policy: Policy) -> Check | None:
    """With labels: the orbit accuracy corrected for the majority-label rate; None without labels."""
    if clean.metric(Metric.ACCURACY) is None:
        return None
    if Metric.ACCURACY_KAPPA not in clean.metrics:  # a hand-built summary: the raw accuracy's kappa, no chance known
        return Check(
            Metric.ACCURACY_KAPPA,
            clean.name,
            None,
            policy.learned_accuracy_kappa_min,
            METRICS[Metric.ACCURACY_KAPPA].kind,
            "learned_task",
        )
    return _chance_check(
        clean,
        Metric.ACCURACY_KAPPA,
        Metric.ACCURACY,
        Metric.ACCURACY_CHANCE,
        policy.learned_accuracy_kappa_min,
        "learned_task",
    )


def _uncertain(checks: list[Check]) -> list[Check]:
    """The checks that could flip this conjunction's outcome with more probes: if it passes, those whose interval
    reaches past the threshold; if it fails, its failures, provided every one of them straddles."""
    if all(c.passed for c in checks):
        return [c for c in checks if c.straddles]
    failing = [c for c in checks if not c.passed]
    return failing if all(c.straddles for c in failing) else []


# --------------------------------------------------------------------------- reasons
def _failure_reasons(checks: list[Check], n_conditions: int, listed: int = 4) -> list[Reason]:
    """One reason per missed genuine criterion: on how many conditions, and the values of the first few."""
    by_metric: dict[Metric, list[Check]] = {}
    for c in checks:
        if not c.passed:
            by_metric.setdefault(c.criterion, []).append(c)
    reasons = []
    for metric, missed in by_metric.items():
        where = [f"{c.condition} {_fmt(c.value)}" for c in missed]
        shown = ", ".join(where[:listed]) + (f", ... (+{len(where) - listed})" if len(where) > listed else "")
        first = missed[0]
        reasons.append(
            _said(
                "genuine_failure",
                f"{metric} misses genuine ({first.requirement}) on {len(missed)} of {n_conditions} conditions",
                shown,
                criterion=str(metric),
                threshold=first.threshold,
                requirement=first.requirement,
                misses=[Miss(condition=c.condition, value=c.value) for c in missed],
                n_conditions=n_conditions,
            )
        )
    return reasons


def _summary(checks: list[Check], role: str) -> str:
    names: dict[str, str] = {
        Metric.KAPPA: "kappa (agreement corrected for its chance level)",
        Metric.ACCURACY_KAPPA: "accuracy_kappa (orbit accuracy corrected for the majority-label rate)",
    }
    return ", ".join(
        f"{names.get(c.criterion, c.criterion)} {_fmt(c.value)} ({role} needs {c.requirement})" for c in checks
    )


def _off_data(conditions: Sequence[Condition], clean: Condition) -> str:
    """How the prediction invariance on the clean probes compares with pure noise (g != e)."""
    noise = find_condition(conditions, ConditionName.NOISE)
    if noise is None:
        return "there is no noise condition to compare with"
    a_clean, a_noise = clean.metric(Metric.AGREEMENT), noise.metric(Metric.AGREEMENT)
    k_clean, k_noise = clean.metric(Metric.KAPPA), noise.metric(Metric.KAPPA)
    kappas = f" (kappa {_fmt(k_clean)} vs {_fmt(k_noise)})" if Metric.KAPPA in clean.metrics else ""
    if a_clean is None or a_noise is None:
        return "agreement on pure noise is unknown"
    trend = "it degrades off the data" if a_noise < a_clean - 0.05 else "it holds about equally off the data"
    return f"agreement on the clean probes {_fmt(a_clean)} vs pure noise {_fmt(a_noise)}{kappas}: {trend}"


def _is_trivial(conditions: Sequence[Condition], policy: Policy) -> list[Reason]:
    clean = find_condition(conditions, ConditionName.CLEAN)
    predictions = clean.predictions if clean is not None else None
    if (
        clean is not None
        and predictions is not None
        and predictions.classes_predicted == 1
        and clean.n_probes >= policy.trivial_single_class_min_probes
    ):
        return [
            _said(
                "label",
                clean.name,
                f"every probe and every orbit element is predicted as class {predictions.majority_class} "
                f"({clean.n_probes} probes): the decision ignores the input, so agreement 1 is chance, "
                "whatever the logits do",
                criterion="classes_predicted",
                condition=clean.name,
                value=1,
            )
        ]
    anchors = [c for c in conditions if c.name in (ConditionName.CLEAN, ConditionName.NOISE)]
    spreads = [c.relative_spread for c in anchors]
    if anchors and all(s is not None and s <= policy.trivial_relative_spread_max for s in spreads):
        return [
            _said(
                "label",
                c.name,
                f"the logits' spread across probes is {_fmt(c.relative_spread)} of their own size "
                f"(<= {policy.trivial_relative_spread_max:g}, float32 rounding is ~1e-7): the output does not "
                "depend on the input beyond floating-point noise, whatever its scale",
                criterion="relative_spread",
                condition=c.name,
                value=c.relative_spread,
                threshold=policy.trivial_relative_spread_max,
                requirement=f"<= {policy.trivial_relative_spread_max:g}",
            )
            for c in anchors
        ]
    computed = [c for c in conditions if c.saliency_computed]
    if computed and all(c.metric(Metric.SI) is None for c in computed):
        return [
            _said(
                "label",
                "every saliency map is zero: the target logit does not depend on the input",
                criterion=str(Metric.SI),
            )
        ]
    return []


def _low_sensitivity(conditions: Sequence[Condition], policy: Policy) -> list[Reason]:
    """A model that reacts little to any input looks invariant for the wrong reason: say so."""
    anchor = find_condition(conditions, ConditionName.CLEAN) or find_condition(conditions, ConditionName.NOISE)
    variation = anchor.relative_variation if anchor is not None else None
    if anchor is not None and variation is not None and variation < policy.low_sensitivity_variation:
        return [
            _said(
                "warning",
                f"{anchor.name}: logits vary little across inputs (relative variation "
                f"{_fmt(variation)} < {policy.low_sensitivity_variation:g})",
                "the invariance may come from insensitivity, not symmetry",
                sep="; ",
                prefix="warning: ",
                criterion="relative_variation",
                condition=anchor.name,
                value=variation,
                threshold=policy.low_sensitivity_variation,
                requirement=f">= {policy.low_sensitivity_variation:g}",
            )
        ]
    return []


# --------------------------------------------------------------------------- the gate
def gate(
    label: str | None,
    require: Iterable[str] | None = None,
    borderline: bool | None = False,
    require_confident: bool | None = False,
) -> bool | None:
    """The one pass/fail rule: the verdict is one of the ``require`` labels (default ``DEFAULT_REQUIRE``) and,
    with ``require_confident``, not borderline. None while there is no verdict. The report, the job status and
    both CLIs use this."""
    if label is None:
        return None
    if require_confident and borderline:
        return False
    return label in (DEFAULT_REQUIRE if require is None else tuple(require))


# --------------------------------------------------------------------------- decide
def decide(
    conditions: Sequence[Condition],
    policy: Policy,
    require: Iterable[str] = DEFAULT_REQUIRE,
    require_confident: bool = False,
) -> Verdict:
    """Label the model from its typed per-condition metrics (``schema.Condition``).

    Returns the typed ``schema.Verdict``, read from the JSON the report carries (``to_json()`` gives it back
    key for key): {label, reasons, reason_details, flags, criteria, borderline, borderline_criteria, policy, require,
    require_confident, passed}: ``reasons`` the sentences, ``reason_details`` the same reasons as data (topic,
    criterion, condition, value, threshold, requirement, misses); ``criteria`` every criterion evaluated on the
    way to the label (structured: criterion, condition, value, threshold, kind, role, interval, n_probes, passed,
    straddles, probes_to_settle, option); ``borderline_criteria`` those whose interval straddles the threshold
    where it decides the label."""
    required = list(require)
    path: list[list[Check]] = []  # the conjunctions that decided the label
    trivial = _is_trivial(conditions, policy)
    if trivial:
        label, reasons = "trivial", trivial
    else:
        label, reasons = _decide(conditions, policy, path)
    evaluated = [c for conj in path for c in conj]
    uncertain = [c for conj in path for c in _uncertain(conj)]
    if uncertain:
        reasons = reasons + [_borderline_reason(uncertain)]
    flags = _low_sensitivity(conditions, policy) if label != "trivial" else []
    passed = gate(label, required, bool(uncertain), require_confident)
    if require_confident and uncertain and label in required:
        reasons = reasons + [_said("require_confident", "require_confident: a borderline verdict fails the gate")]
    reasons = reasons + flags
    return Verdict.model_validate(
        {
            "label": label,
            "reasons": [r.text for r in reasons],
            "reason_details": [r.as_dict() for r in reasons],
            "flags": ["low_sensitivity"] if flags else [],
            "criteria": [c.as_dict() for c in evaluated],
            "borderline": bool(uncertain),
            "borderline_criteria": [c.as_dict() for c in uncertain],
            "policy": policy.model_dump(),
            "require": required,
            "require_confident": bool(require_confident),
            "passed": passed,
        }
    )


def _decide(conditions: Sequence[Condition], policy: Policy, path: list[list[Check]]) -> tuple[str, list[Reason]]:
    genuine = [c for cond in conditions for c in genuine_checks(cond, policy)]
    path.append(genuine)
    if all(c.passed for c in genuine):
        return "genuine", [
            _said(
                "label",
                f"invariant within tolerance on all {len(conditions)} conditions "
                f"({', '.join(c.name for c in conditions)}), every criterion over g != e",
            )
        ]
    failures = _failure_reasons(genuine, len(conditions))
    clean = find_condition(conditions, ConditionName.CLEAN)
    if clean is None:
        return "not_genuine", failures + [
            _said(
                "label",
                "no in-distribution probes were given, so learned and not_invariant cannot be separated",
                "pass --probes (and --labels) to decide",
            )
        ]
    predictions = prediction_checks(clean, policy)
    path.append(predictions)
    if not all(c.passed for c in predictions):
        return "not_invariant", [
            _said(
                "label",
                "predictions are not invariant beyond chance on in-distribution probes",
                f"{clean.name}: {_summary(predictions, 'learned')}",
                condition=clean.name,
            )
        ] + [
            _said(
                "label",
                f"learned needs {c.criterion} {c.requirement}, got {_fmt(c.value)}",
                criterion=str(c.criterion),
                condition=c.condition,
                value=c.value,
                threshold=c.threshold,
                requirement=c.requirement,
            )
            for c in predictions
            if not c.passed
        ]
    invariant = _said(
        "label",
        "predictions are invariant on in-distribution probes",
        f"{clean.name}: {_summary(predictions, 'learned')}",
        condition=clean.name,
    )
    off_data = _off_data(conditions, clean)
    task = task_check(clean, policy)
    if task is None:
        return "undecided", [
            invariant,
            _said(
                "label",
                "but without labels the audit cannot tell learned invariance from incidental invariance "
                "(a random network with global pooling is nearly flip-invariant by accident, and its "
                f"invariance degrades off the data too; {off_data})",
                "pass --labels to decide, or accept undecided with --require",
                sep=": ",
            ),
            _said("heading", "and genuine invariance fails:"),
        ] + failures
    path.append([task])
    task_data: dict[str, Any] = {
        "criterion": str(task.criterion),
        "condition": task.condition,
        "value": task.value,
        "threshold": task.threshold,
        "requirement": task.requirement,
    }
    if task.passed:
        return "learned", [
            invariant,
            _said(
                "label",
                "the model learned the task",
                f"{clean.name}: {_summary([task], 'learned')}; {off_data}",
                **task_data,
            ),
            _said("heading", "but genuine invariance fails:"),
        ] + failures
    return "incidental", [
        invariant,
        _said(
            "label",
            "but the labels show the model did not learn the task",
            f"{clean.name}: {_summary([task], 'learned')}, so the invariance is incidental (of the "
            f"architecture, not learned from data); {off_data}",
            **task_data,
        ),
        _said("heading", "and genuine invariance fails:"),
    ] + failures


def _borderline_reason(uncertain: list[Check]) -> Reason:
    parts = []
    for c in uncertain:
        needed = c.probes_to_settle()
        settle = (
            f"about {needed} probes ({c.option()}) would settle it"
            if needed is not None
            else "more probes cannot settle it at this estimate"
        )
        parts.append(f"{c.describe()} against {c.role} {c.requirement}: {settle}")
    first = uncertain[0]
    return _said(
        "borderline",
        "borderline",
        "95% interval straddles the threshold for " + "; ".join(parts),
        sep=": the ",
        criterion=str(first.criterion),
        condition=first.condition,
        value=first.value,
        threshold=first.threshold,
        requirement=first.requirement,
    )
