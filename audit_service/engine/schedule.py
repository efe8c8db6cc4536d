"""The sweep schedule: the conditions in order, where SI is computed, and when each SI pass stops.

It follows an ``AuditPlan`` (``plan.py``). Every condition is swept forward-only first (one model pass a sample);
SI follows where it can change the verdict (``decisive``) or everywhere (``all``). In ``decisive`` SI runs in probe
batches: a condition stops once the confidence bound on its SI (``sequential.si_bound``) is clear of the genuine
threshold (``decided``), or after its first batch with a defined SI when another criterion already rules genuine
out (``not_needed``: its SI can then only tell whether every saliency map is zero), else at its probe budget (``cap``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .guard import guarded
from .metrics import summarize
from .metrics.saliency import IG_METHOD
from .names import ConditionName
from .report.build import condition_report
from .schema import Condition as ConditionReport
from .schema import ConditionMetrics, ConditionSpreads, SaliencySampling
from .sequential import Stopped, decided, relative_completeness, si_bound
from .spec import AuditSpec
from .sweep import Condition, ConditionResult, OrbitSweep, SweepOutcome
from .verdict import decide, genuine_checks, genuine_failures

#: the conditions the report always needs (the paper's SI is computed there)
ANCHORS = tuple(c.value for c in ConditionName)


def audit_conditions(shifts: list, has_probes: bool) -> list[Condition]:
    """The report's rows in order: clean and one per shift (with probes), then pure noise."""
    conditions = []
    if has_probes:
        conditions.append(Condition(ConditionName.CLEAN.value, keep_examples=True))
        conditions += [Condition(s.label, shift=s) for s in shifts]
    conditions.append(Condition(ConditionName.NOISE.value, noise=True, keep_examples=True))
    return conditions


def run_sweep(
    sweep: OrbitSweep, conditions: list[Condition], spec: AuditSpec, tick: Callable[[str], Callable[[], None]]
) -> SweepOutcome:
    """Sweep the conditions as the sweep's plan says (see the module docstring)."""
    options, policy, plan = spec.options, spec.policy, sweep.plan
    scope = plan.scope
    anchors = [c for c in conditions if c.name in ANCHORS]
    shifted = [c for c in conditions if c not in anchors]
    done: dict[str, ConditionResult] = {}
    reasons: dict[str, str] = {}
    provisional = _Provisional(spec)

    def forward(condition: Condition) -> None:  # ``all``: SI in the same pass, on every probe
        done[condition.name] = guarded(
            lambda: sweep.run(condition, tick(condition.name), saliency=scope == "all"),
            f"sweeping condition {condition.name}",
        )

    def saliency(condition: Condition) -> None:
        result = done[condition.name]
        if result.saliency_computed:
            return
        cap = result.accumulator.n
        value_only = provisional.genuine_ruled_out(done.values(), without_si_of=condition.name)
        looks = plan.looks(cap)

        def should_stop(r: ConditionResult) -> Stopped | None:
            bound = si_bound(
                r.accumulator.values("SI", identity=False), plan.confidence, looks, options.bootstrap, options.seed
            )
            if bound is None:  # no defined SI yet (every map so far is zero): go on
                return None
            if value_only:
                return "not_needed"
            return "decided" if decided(bound, plan.si_threshold) else None

        guarded(
            lambda: sweep.add_saliency(result, tick(condition.name), plan.si_batch(cap), should_stop),
            f"computing the saliency of condition {condition.name}",
        )

    for condition in anchors:
        forward(condition)
    stopped: str | None = None
    skipped: list[dict] = []
    if plan.early_stop and shifted:
        if scope == "decisive":
            for condition in anchors:
                saliency(condition)
        stopped = _settled([done[c.name] for c in anchors], spec)
        if stopped:
            skipped = [{"name": c.name, "reason": stopped} for c in shifted]
            shifted = []
    for condition in shifted:
        forward(condition)
    if scope == "decisive":
        for condition in anchors:
            saliency(condition)

    if scope == "decisive" and shifted:
        reports = [provisional.report(r) for r in done.values()]
        failing = [f"{c.name} {metric}" for c in reports for metric, _, _ in genuine_failures(c, policy)]
        computed = [c for c in reports if c.saliency_computed]
        anchors_zero = bool(computed) and all(c.metrics.SI is None for c in computed)
        if not failing or anchors_zero:
            scope_reason = (
                "SI on every condition: the model meets the genuine criteria on the forward "
                "metrics everywhere, so SI decides"
                if not failing
                else "SI on every condition: every saliency map on clean and noise is zero, so SI "
                "decides whether the model is trivial"
            )
            for condition in shifted:
                saliency(condition)
        else:
            listed = ", ".join(failing[:4]) + (f" and {len(failing) - 4} more" if len(failing) > 4 else "")
            scope_reason = (
                f"SI on clean and noise only (the paper's SI): genuine criteria already fail "
                f"({listed}), so SI on the shifts cannot change the verdict"
            )
            for condition in shifted:
                reasons[condition.name] = (
                    "not computed (options.saliency_scope = decisive): genuine criteria "
                    f"already fail ({listed}), so SI here cannot change the verdict"
                )
    elif scope == "decisive":
        scope_reason = (
            "SI on clean and noise; the shifts were skipped (options.early_stop)"
            if stopped
            else "SI on every condition (there are no shifts)"
        )
    elif scope == "all":
        scope_reason = "SI on every condition (options.saliency_scope = all)"
    else:
        why = (
            "options.saliency = false"
            if not options.saliency
            else "options.saliency_scope = none"
            if options.saliency_scope == "none"
            else "no saliency method"
        )
        scope_reason = f"SI not computed: {why}"
        reasons.update({name: f"saliency was switched off ({why})" for name in done})
    results = [done[c.name] for c in conditions if c.name in done]
    sampling = {r.condition.name: _sampling(r, sweep) for r in results if r.saliency_computed}
    return SweepOutcome(scope, results, reasons, sampling, scope_reason, stopped, skipped)


class _Provisional:
    """Condition reports of results still being swept, for the genuine criteria (with the final report's bootstrap
    intervals, so that "clearly fails" means what the verdict will read); cached per result state."""

    def __init__(self, spec: AuditSpec) -> None:
        self.spec = spec
        self._cache: dict[tuple, ConditionReport] = {}

    def report(self, result: ConditionResult, with_si: bool = True) -> ConditionReport:
        """The genuine criteria's part of the condition's report: name, metrics and spread of LI_normalized, DI,
        agreement and SI over g != e (``report.build.condition_report`` computes the same numbers, and more)."""
        si = with_si and result.saliency_computed
        key = (result.condition.name, si, result.saliency_probes if si else 0)
        if key not in self._cache:
            options, acc = self.spec.options, result.accumulator
            variation = acc.sample_variation
            values = {name: acc.values(name, identity=False) for name in ("DI", "agreement", "SI")}
            values["LI_normalized"] = (
                acc.values("sq_dist", identity=False) / variation if variation > 0 else np.empty(0)
            )
            if not si:
                values["SI"] = np.empty(0)
            spread = {name: summarize(v, options.bootstrap, options.seed) for name, v in values.items()}
            self._cache[key] = ConditionReport(
                name=result.condition.name,
                shift=result.condition.shift,
                n_probes=acc.n,
                saliency_computed=si,
                metrics=ConditionMetrics.model_validate({name: (s or {}).get("mean") for name, s in spread.items()}),
                spread=ConditionSpreads.model_validate(spread),
            )
        return self._cache[key]

    def genuine_ruled_out(self, results, without_si_of: str) -> bool:
        """A genuine criterion other than ``without_si_of``'s SI fails with its interval clear of the threshold:
        genuine is out whatever that SI shows, and no borderline flag could come from it."""
        for result in results:
            report = self.report(result, with_si=result.condition.name != without_si_of)
            if any(not c.passed and not c.straddles for c in genuine_checks(report, self.spec.policy)):
                return True
        return False


def _sampling(result: ConditionResult, sweep: OrbitSweep) -> SaliencySampling:
    """The report's ``saliency_sampling`` of a condition with SI: the bound where it stopped, and the method."""
    options, plan, cap = sweep.options, sweep.plan, result.accumulator.n
    ig = sweep.saliency.ig if sweep.saliency is not None else None
    bound = si_bound(
        result.accumulator.values("SI", identity=False),
        plan.confidence,
        plan.looks(cap),
        options.bootstrap,
        options.seed,
    )
    return SaliencySampling(
        probes_used=result.saliency_probes,
        probes_cap=cap,
        interval=None if bound is None else [float(bound[0]), float(bound[1])],
        confidence=plan.confidence,
        stopped=result.saliency_stopped or "cap",
        ig_method=IG_METHOD if ig is not None else "occlusion",
        ig_steps=(ig.steps or 0) if ig is not None else 0,
        completeness_error=relative_completeness(result.completeness) if ig is not None else None,
    )


def provisional_report(result: ConditionResult) -> ConditionReport:
    """A condition's means with its chance levels, enough for ``genuine_failures`` and ``decide`` (no bootstrap:
    the sweep is not done yet)."""
    return ConditionReport.model_validate(condition_report(result, 0, 0, result.saliency_computed))


def _settled(anchor_results, spec: AuditSpec) -> str | None:
    """Why clean and noise already settle the verdict, or None.

    A genuine criterion that fails on clean or noise rules out ``genuine`` whatever the shifts show; the
    label is then ``learned``, ``not_invariant`` or ``trivial``, which depend on clean and noise only
    (``verdict.decide``). Unless every anchor saliency map is zero: then the shifts' SI can decide trivial.
    """
    reports = [provisional_report(r) for r in anchor_results]
    if any(c.saliency_computed for c in reports) and all(c.metrics.SI is None for c in reports if c.saliency_computed):
        return None
    failing = [
        f"{c.name} {metric} {'null' if value is None else f'{value:.4g}'} (genuine needs {need})"
        for c in reports
        for metric, value, need in genuine_failures(c, spec.policy)
    ]
    if not failing:
        return None
    label = decide(reports, spec.policy, spec.require).label
    return (
        f"the verdict ({label}) is settled by clean and noise: {'; '.join(failing[:3])}; the shifts and "
        "the Jacobian would only fill the report"
    )
