"""The compact answer to ``POST /audit?wait=``: the verdict, the gate, the headline metrics per condition and
the links; the full report stays at its link."""

from __future__ import annotations

HEADLINE = ("LI_normalized", "DI", "SI", "agreement", "accuracy")


def report_summary(report: dict, job_id: str) -> dict:
    """``{id, status, verdict, passed, borderline, reasons, conditions: {name: {metric: mean}}, reference_profile,
    links}`` (the metrics over g != e, as the verdict reads them)."""
    verdict = report.get("verdict") or {}
    conditions = {}
    for cond in report.get("conditions") or []:
        if isinstance(cond, dict) and "name" in cond:
            metrics = cond.get("metrics") or {}
            conditions[str(cond["name"])] = {k: metrics.get(k) for k in HEADLINE}
    profile = report.get("reference_profile")
    closest = profile.get("name") if isinstance(profile, dict) and verdict.get("label") != "trivial" else None
    base = f"/audits/{job_id}"
    return {
        "id": job_id,
        "status": "succeeded",
        "verdict": verdict.get("label"),
        "passed": verdict.get("passed"),
        "borderline": verdict.get("borderline"),
        "reasons": list(verdict.get("reasons") or []),
        "conditions": conditions,
        "reference_profile": closest,
        "links": {"self": base, "report": f"{base}/report", "report_html": f"{base}/report.html"},
    }
