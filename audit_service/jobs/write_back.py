"""The MLflow write-back of an audit submitted with ``mlflow_write_back=true``, done by the worker.

Why the worker: the request is stored with the job (``inputs.model.mlflow``, written at submission), so it
survives what a thread of the web process would not (a restarted or recycled web worker, another web worker
answering the poll); the worker writes back before it records the job as succeeded, so a worker that dies
in between leaves a job that is run again, write-back included. The outcome is part of the report
(``report.mlflow_write_back``): a registry that is down costs the tags, never the audit.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from .settings import Settings

log = logging.getLogger("audit_service.jobs")

#: attempts at the registry, with 1 s, 2 s pauses between them
ATTEMPTS = 3


def write_back_request(located: Any, registry_name: str) -> dict[str, Any]:
    """What the worker needs to write back to the model ``located`` at submission (``Located`` of
    ``mlflow_registry``): the version an alias named then, not the one it names when the audit ends."""
    return {"registry": registry_name, "uri": located.ref.uri, "directory": located.directory,
            "file": located.file, "flavor": located.flavor, "version": located.version, "run_id": located.run_id}


def requested(job: dict) -> dict[str, Any] | None:
    """The job's write-back request, or None."""
    model = (job.get("inputs") or {}).get("model") or {}
    request = model.get("mlflow")
    return request if isinstance(request, dict) else None


def write_back(request: dict[str, Any], report: dict, settings: Settings, pause_s: float = 1.0,
               before_attempt: Callable[[], bool] = lambda: True) -> dict[str, Any]:
    """Tag the audited model version (or run) with ``report``'s verdict and log the reports (see
    ``Registry.write_back``); ``{"status": "written", "tags": ...}`` or ``{"status": "failed", "error": ...}``.
    ``before_attempt`` runs before each try at the registry (the worker renews the job's lease there); when it
    says False the job is no longer ours (cancelled) and nothing is written."""
    from ..adapters.mlflow_registry import Located, Registry, parse_allowed, parse_model_uri
    from ..engine.report.html import render_report_html
    from .failures import cap_text

    tracking = parse_allowed(settings.mlflow_allowed_uris).get(str(request.get("registry")))
    target = {"uri": request.get("uri"), "version": request.get("version")}
    if tracking is None:
        return {"status": "failed", **target, "attempts": 0,
                "error": f"the registry {str(request.get('registry'))[:80]!r} is no longer in this worker's "
                         "AUDIT_MLFLOW_ALLOWED_URIS"}
    error = "not attempted"
    for attempt in range(1, ATTEMPTS + 1):
        if not before_attempt():
            return {"status": "failed", **target, "attempts": attempt - 1,
                    "error": "the job was cancelled or taken back before its verdict was written"}
        try:
            located = Located(ref=parse_model_uri(str(request["uri"])), directory=str(request["directory"]),
                              file=str(request["file"]), flavor=str(request["flavor"]),
                              version=request.get("version"), run_id=request.get("run_id"))
            tags = Registry(tracking, proxied_only=True).write_back(located, report, render_report_html(report))
            return {"status": "written", **target, "attempts": attempt, "tags": tags}
        except Exception as exc:  # noqa: BLE001 - the registry's failure is reported, the audit stands
            error = cap_text(f"{type(exc).__name__}: {exc}")
            log.warning("MLflow write-back to %s failed (attempt %d of %d): %s", target["uri"], attempt, ATTEMPTS,
                        error)
            if attempt < ATTEMPTS:
                time.sleep(pause_s * 2 ** (attempt - 1))
    return {"status": "failed", **target, "attempts": ATTEMPTS, "error": error}
