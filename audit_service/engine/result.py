"""``AuditResult``: the typed report, for Python callers.

It wraps ``schema.Report`` (the JSON contract as pydantic models): ``result.verdict.label``,
``result.condition("clean").LI_normalized``, ``result.sensitivity.sigma_max_mean`` are typed fields of the
report itself, not a second reading of a dict. ``to_json()`` gives the JSON the service stores and the CLI
writes, key for key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .names import PROFILE_METRICS
from .schema import Condition, GroupSection, ModelSection, Report, Sensitivity, Verdict, parse_report

#: the public names ``audit_service.Verdict`` / ``audit_service.ConditionResult``: the report's own models
ConditionResult = Condition
__all__ = ["AuditResult", "ConditionResult", "Verdict", "Report"]


@dataclass(frozen=True)
class AuditResult:
    """One audit's report: typed sections, the gate, the HTML page."""

    report: Report

    @classmethod
    def from_report(cls, report: dict[str, Any] | Report) -> "AuditResult":
        """The result of a report dict (as ``run_audit`` returns and the service stores it) or a ``Report``."""
        return cls(parse_report(report))

    # the report's sections read through: ``result.verdict`` is ``result.report.verdict``
    @property
    def verdict(self) -> Verdict:
        return self.report.verdict

    @property
    def sensitivity(self) -> Sensitivity:
        return self.report.sensitivity

    @property
    def model(self) -> ModelSection:
        return self.report.model

    @property
    def group(self) -> GroupSection:
        return self.report.group

    @property
    def conditions(self) -> tuple[Condition, ...]:
        return tuple(self.report.conditions)

    @property
    def label(self) -> str:
        return self.verdict.label

    @property
    def passed(self) -> bool:
        return bool(self.verdict.passed)

    def condition(self, name: str) -> Condition:
        """The condition called ``name`` ("clean", "noise", "blur@3"); a KeyError names those the audit ran."""
        return self.report.condition(name)

    def to_json(self) -> dict[str, Any]:
        """The report in the service's JSON schema (a fresh dict: mutating it leaves the result alone)."""
        return self.report.to_json()

    def to_html(self, base_url: str | None = None) -> str:
        from .report.html import render_report_html

        return render_report_html(self.report, base_url=base_url)

    def _repr_html_(self) -> str:  # notebooks show the report
        return self.to_html()

    def __repr__(self) -> str:
        head = f"AuditResult({self.verdict.label}, passed={self.verdict.passed}, group={self.group.name}"
        shown = self.report.headline_condition
        if shown is not None:
            values = {m: shown.metrics.get(m) for m in PROFILE_METRICS if m in shown.metrics}
            head += ", " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        return head + ")"
