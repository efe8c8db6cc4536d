"""The report: every section of one audit, and ``parse_report`` that reads the JSON into it."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from ..names import ConditionName
from ..spec import REPORT_KEYS, AuditSpec
from .base import STRICT, ReportModel
from .conditions import Condition, find_condition
from .sections import (
    EarlyStop,
    GroupSection,
    MlflowWriteBack,
    ModelSection,
    ReferenceProfile,
    SaliencyExample,
    SaliencyScope,
    Sensitivity,
    SkippedShift,
    Symmetrized,
    Timing,
)
from .verdict import ReportPolicy, Verdict


class ReportSpec(AuditSpec):
    """The spec the audit ran, echoed: ``spec.AuditSpec`` with the policy as the report carries it."""

    policy: ReportPolicy = ReportPolicy()


class Report(ReportModel):
    """The engine's report of one audit."""

    #: the sections every report has (``spec.REPORT_KEYS``, the contract since schema 1.0): required fields here
    REQUIRED: ClassVar[tuple[str, ...]] = REPORT_KEYS

    schema_version: str
    service_version: str | None = None
    created_at: str | None = None
    model: ModelSection
    group: GroupSection
    conditions: list[Condition]
    sensitivity: Sensitivity
    verdict: Verdict
    saliency_examples: list[SaliencyExample] = Field(default_factory=list)
    spec: ReportSpec | None = None
    shifts_skipped: list[SkippedShift] = Field(default_factory=list)
    saliency: SaliencyScope | None = None
    early_stop: EarlyStop | None = None
    timing: Timing
    reference_profile: ReferenceProfile | None = None
    symmetrized: Symmetrized | None = Field(
        default=None, description="for a model that is not genuine: what its orbit average costs and keeps"
    )
    mlflow_write_back: MlflowWriteBack | None = None

    def condition(self, name: str) -> Condition:
        """The condition called ``name``; a KeyError names the conditions the audit ran."""
        found = self.find(name)
        if found is None:
            raise KeyError(f"no condition {name!r}; the audit ran {[c.name for c in self.conditions]}")
        return found

    def find(self, name: str) -> Condition | None:
        return find_condition(self.conditions, name)

    @property
    def clean(self) -> Condition | None:
        return self.find(ConditionName.CLEAN)

    @property
    def noise(self) -> Condition | None:
        return self.find(ConditionName.NOISE)

    @property
    def headline_condition(self) -> Condition | None:
        """The clean probes' condition; without probes, the first one (noise)."""
        return self.clean or (self.conditions[0] if self.conditions else None)


def parse_report(report: dict[str, Any] | Report, strict: bool = False) -> Report:
    """The typed report of a JSON dict (a ``Report`` is returned as it is). ``strict``: an unmodelled key
    anywhere is a ValidationError (tests, and the OpenAPI sync check)."""
    if isinstance(report, Report):
        return report
    return Report.model_validate(report, context={STRICT: True} if strict else None)
