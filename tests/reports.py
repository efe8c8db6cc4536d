"""A real audit's report for tests that store one: the shipped reference run R4_WT_s0's, typed, with the
verdict, group or top-level keys a test needs. The job store reads the typed fields (verdict, gate, group
order, write-back), so a test hands it a whole report, never a fragment."""

from __future__ import annotations

import json
from typing import Any

from audit_service.engine.schema import Report, parse_report
from audit_service.reference.catalog import reference_dir


def stored_report(verdict: dict[str, Any] | None = None, group: dict[str, Any] | None = None,
                  **extra: Any) -> Report:
    """R4_WT_s0's report with ``verdict`` / ``group`` fields replaced and ``extra`` top-level keys added."""
    data = json.loads((reference_dir() / "R4_WT_s0" / "report.json").read_text())
    data["verdict"].update(verdict or {})
    data["group"].update(group or {})
    return parse_report({**data, **extra})
