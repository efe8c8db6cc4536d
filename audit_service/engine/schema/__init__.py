"""The report as typed models: the JSON contract of ``GET /audits/{id}/report``, the CLI's ``--json`` and
``AuditResult``, and the typed conditions the verdict decides on.

The engine builds the report as a plain dict (``report.build``); ``Report.model_validate(report)`` is its
typed face, and ``Report.to_json()`` gives the same JSON back (key for key: the round-trip tests keep it so).
Every consumer (the verdict, the HTML page, the compact summary, the CLI table, the MLflow tags, the reference
profile) reads these fields instead of string keys.

Models accept keys they do not know (a newer engine's report still reads, and its keys survive the round
trip); ``parse_report(d, strict=True)`` refuses them, which the tests use so that an unmodelled key fails.
The OpenAPI ``Report`` component is generated from these models (``service.openapi_report``).

It sits low in the engine (pydantic, ``names`` and ``spec`` only), so that the verdict reads typed conditions:
``base`` (the models' base), ``conditions``, ``verdict``, ``sections`` (model, group, sensitivity, timing ...)
and ``report`` (the whole report and ``parse_report``).
"""

from .base import STRICT, ReportModel
from .conditions import (
    Condition,
    ConditionMetrics,
    ConditionSpreads,
    Predictions,
    SaliencySampling,
    SampledInterval,
    Spread,
    find_condition,
)
from .report import Report, ReportSpec, parse_report
from .sections import (
    Autocast,
    EarlyStop,
    GroupSection,
    MemoryFormat,
    MlflowWriteBack,
    ModelSection,
    ProfileRun,
    ReferenceProfile,
    SaliencyExample,
    SaliencyScope,
    SampledGroup,
    Sensitivity,
    SigmaMax,
    SkippedCondition,
    SkippedShift,
    Symmetrized,
    Timing,
)
from .verdict import Criterion, CriterionRole, Miss, Reason, ReasonTopic, ReportPolicy, Verdict

__all__ = [
    "STRICT",
    "Autocast",
    "Condition",
    "ConditionMetrics",
    "ConditionSpreads",
    "Criterion",
    "CriterionRole",
    "EarlyStop",
    "GroupSection",
    "MemoryFormat",
    "Miss",
    "MlflowWriteBack",
    "ModelSection",
    "Predictions",
    "ProfileRun",
    "Reason",
    "ReasonTopic",
    "ReferenceProfile",
    "Report",
    "ReportModel",
    "ReportPolicy",
    "ReportSpec",
    "SaliencyExample",
    "SaliencySampling",
    "SaliencyScope",
    "SampledGroup",
    "SampledInterval",
    "Sensitivity",
    "SigmaMax",
    "SkippedCondition",
    "SkippedShift",
    "Spread",
    "Symmetrized",
    "Timing",
    "Verdict",
    "find_condition",
    "parse_report",
]
