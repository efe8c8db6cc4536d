"""The compact answer to ``POST /audit?wait=``: the verdict, the gate, the headline metrics per condition and
the links; the full report stays at its link."""

from __future__ import annotations

from typing import Any

from ..names import HEADLINE_METRICS
from ..schema import Report, parse_report

#: the metrics the summary shows per condition (``engine.names``: the table's headline rows)
HEADLINE = HEADLINE_METRICS


def report_summary(report: Report | dict[str, Any], job_id: str) -> dict[str, Any]:
    """``{id, status, verdict, passed, borderline, reasons, conditions: {name: {metric: mean}}, reference_profile,
    links}`` (the metrics over g != e, as the verdict reads them)."""
    report = parse_report(report)
    verdict = report.verdict
    conditions = {c.name: {str(m): c.metrics.get(m) for m in HEADLINE} for c in report.conditions}
    profile = report.reference_profile
    closest = profile.name if profile is not None and verdict.label != "trivial" else None
    base = f"/audits/{job_id}"
    return {
        "id": job_id,
        "status": "succeeded",
        "verdict": verdict.label,
        "passed": verdict.passed,
        "borderline": verdict.borderline,
        "reasons": list(verdict.reasons),
        "conditions": conditions,
        "reference_profile": closest,
        "links": {"self": base, "report": f"{base}/report", "report_html": f"{base}/report.html"},
    }
