"""``AuditResult``: the typed face of a report, for Python callers.

The JSON report (``spec.REPORT_KEYS``) stays the one source of truth: the service stores it, the
CLI writes it, and ``AuditResult.from_report`` reads it back. Attribute access gives typed values
(``result.verdict.label``, ``result.condition("clean").LI``) without anyone re-parsing dicts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Verdict:
    label: str  #: genuine | learned | incidental | undecided | not_invariant | trivial | not_genuine
    passed: bool  #: the gate: label in ``require`` (and, with ``require_confident``, not borderline)
    reasons: tuple[str, ...]
    require: tuple[str, ...]
    policy: dict[str, Any]
    #: a deciding criterion's 95% interval straddles its threshold (``borderline_criteria`` in the JSON)
    borderline: bool = False


@dataclass(frozen=True)
class ConditionResult:
    """One condition (clean probes, a shift at a severity, pure noise): means and spreads."""

    name: str
    n_probes: int
    metrics: dict[str, float | None]
    spread: dict[str, Any]
    saliency_computed: bool | None
    notes: tuple[str, ...] = ()

    def __getattr__(self, metric: str) -> float | None:  # result.condition("clean").LI
        metrics = self.__dict__.get("metrics", {})
        if metric in metrics:
            return metrics[metric]
        raise AttributeError(f"{type(self).__name__} has no metric {metric!r}; it has {sorted(metrics)}")


@dataclass(frozen=True)
class Sensitivity:
    sigma_max_mean: float | None
    spectrum: tuple[float, ...]
    method: str | None
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


@dataclass(frozen=True)
class AuditResult:
    verdict: Verdict
    conditions: tuple[ConditionResult, ...]
    sensitivity: Sensitivity
    model: dict[str, Any]
    group: dict[str, Any]
    _report: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_report(cls, report: dict[str, Any]) -> "AuditResult":
        v = report["verdict"]
        verdict = Verdict(label=v["label"], passed=bool(v.get("passed")), reasons=tuple(v.get("reasons") or ()),
                          require=tuple(v.get("require") or ()), policy=dict(v.get("policy") or {}),
                          borderline=bool(v.get("borderline")))
        conditions = tuple(
            ConditionResult(name=c["name"], n_probes=int(c.get("n_probes") or 0), metrics=dict(c.get("metrics") or {}),
                            spread=dict(c.get("spread") or {}), saliency_computed=c.get("saliency_computed"),
                            notes=tuple(c.get("notes") or ()))
            for c in report.get("conditions") or ())
        s = report.get("sensitivity") or {}
        sigma = s.get("sigma_max") or {}
        sensitivity = Sensitivity(sigma_max_mean=sigma.get("mean") if isinstance(sigma, dict) else None,
                                  spectrum=tuple(s.get("spectrum") or ()), method=s.get("method"), raw=dict(s))
        return cls(verdict=verdict, conditions=conditions, sensitivity=sensitivity, model=dict(report.get("model") or {}),
                   group=dict(report.get("group") or {}), _report=report)

    @property
    def label(self) -> str:
        return self.verdict.label

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    def condition(self, name: str) -> ConditionResult:
        for c in self.conditions:
            if c.name == name:
                return c
        raise KeyError(f"no condition {name!r}; the audit ran {[c.name for c in self.conditions]}")

    def to_json(self) -> dict[str, Any]:
        """The report in the service's JSON schema (a deep copy: mutating it leaves the result alone)."""
        return copy.deepcopy(self._report)

    def to_html(self, base_url: str | None = None) -> str:
        from .report.html import render_report_html

        return render_report_html(self._report, base_url=base_url)

    def _repr_html_(self) -> str:  # notebooks show the report
        return self.to_html()

    def __repr__(self) -> str:
        clean = next((c for c in self.conditions if c.name == "clean"), self.conditions[0] if self.conditions else None)
        head = f"AuditResult({self.verdict.label}, passed={self.verdict.passed}, group={self.group.get('name')}"
        if clean is not None:
            shown = {k: clean.metrics.get(k) for k in ("LI_normalized", "DI", "SI", "agreement") if k in clean.metrics}
            head += ", " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        return head + ")"
