"""Pydantic models for every request and response body of the HTTP API (mirrored in ``openapi.yaml``)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..jobs.states import JobStatus
from ..jobs.store import Job, JobSummary
from ..engine.verdict import gate


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------- requests
class SubmitQuery(_Model):
    """Query of ``POST /audit``."""

    wait: float = Field(default=0.0, ge=0, le=600, description="seconds to wait for the report (capped)")


class SubmitForm(_Model):
    """Non-file form fields of ``POST /audit`` (the spec is parsed by ``spec.parse_audit_spec``)."""

    timeout_s: float | None = Field(default=None, gt=0, description="wall-clock limit, capped by the server")
    reuse: bool = Field(default=True, description="answer with a finished identical audit's report (dedupe key)")


class ListQuery(_Model):
    limit: int = Field(default=20, ge=1, le=100)
    offset: int = Field(default=0, ge=0, le=1_000_000_000)
    status: JobStatus | None = None


class ReferenceRunRequest(_Model):
    epochs: int | None = Field(default=None, ge=1, le=1000)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)


# ----------------------------------------------------------------------------- responses
class JobLinks(_Model):
    self: str
    report: str | None = None
    report_html: str | None = None


class JobErrorOut(_Model):
    type: str
    message: str
    field: str | None = None


class Timings(_Model):
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    queued_s: float | None = Field(default=None, description="created -> started (or now)")
    run_s: float | None = Field(default=None, description="started -> finished (or now)")


class InputFile(_Model):
    sha256: str
    size_bytes: int
    filename: str | None = None
    format: str | None = None
    #: the model of a ``model_uri`` audit with ``mlflow_write_back``: where the worker writes back
    mlflow: dict[str, Any] | None = None


class _JobHead(_Model):
    """What a job and a job list's item both start with (the rest differs in content and order: the JSON keeps
    the key order clients have always seen)."""

    id: str
    kind: Literal["audit", "reference_run"]
    status: JobStatus
    progress: float = Field(ge=0, le=1)
    stage: str


#: the gate as a job shows it
_PASSED = Field(default=None, description="the gate: verdict in spec.require (null until done)")


class JobOut(_JobHead):
    """``GET /audits/{id}``: the job with its whole spec and inputs."""

    attempts: int
    timeout_s: float
    timings: Timings
    error: JobErrorOut | None = None
    verdict: str | None = None
    passed: bool | None = _PASSED
    inputs: dict[str, InputFile]
    spec: dict[str, Any]
    links: JobLinks
    write_back: dict[str, Any] | None = Field(
        default=None, description="the MLflow write-back (mlflow_write_back=true): pending until the worker tried, "
                                  "then written (with the tags) or failed (with why); skipped when the audit failed")


def write_back_view(job: Job) -> dict[str, Any] | None:
    """The write-back step as the job shows it: the worker's outcome, or where it stands before that."""
    if job.write_back is not None:
        return job.write_back
    asked = ((job.inputs or {}).get("model") or {}).get("mlflow")
    if not isinstance(asked, dict):
        return None
    status = "pending" if not job.ready else "skipped"
    return {"status": status, "uri": asked.get("uri"), "version": asked.get("version")}


class GroupSummary(_Model):
    name: str | None = None
    order: int | None = Field(default=None, description="null where only building the group tells (permutations) "
                                                       "until the audit finished")


class SpecSummary(_Model):
    """What a job list shows of a spec (``jobs.summaries.spec_summary``); the whole spec is at ``/audits/{id}``."""

    group: GroupSummary
    shifts: int
    conditions: int = Field(description="noise, clean (with probes) and one per shift")
    n_probes: int | None = None
    device: str | None = None
    require: list[str] | None = None


class JobSummaryOut(_JobHead):
    """One item of ``GET /audits``: no spec, inputs or report, so a page stays a few hundred bytes per job."""

    timings: Timings
    error: JobErrorOut | None = None
    verdict: str | None = None
    passed: bool | None = _PASSED
    spec: SpecSummary
    links: JobLinks


class JobList(_Model):
    items: list[JobSummaryOut]
    total: int
    limit: int
    offset: int
    next: str | None = None


class CatalogueOut(_Model):
    items: list[dict[str, Any]]


class HealthOut(_Model):
    status: Literal["ok"]


class ReadyOut(_Model):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str]
    queue_depth: int | None = None


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def _gate(job: JobSummary, require: Any) -> bool | None:
    """Whether a finished audit passed its gate: the report's own answer (its ``require`` and, with
    ``require_confident``, not borderline); for rows stored before that was kept, the label against ``require``
    (the spec's)."""
    if job.kind != "audit" or not job.verdict:
        return None
    if job.passed is not None:
        return job.passed
    return gate(job.verdict, require)


def _error(job: JobSummary) -> JobErrorOut | None:
    return JobErrorOut(**job.error.to_dict()) if job.error is not None else None


def _timings(created: float, started: float | None, ended: float | None, now: float) -> Timings:
    queued_s = (started if started is not None else (ended if ended is not None else now)) - created
    run_s = None if started is None else (ended if ended is not None else now) - started
    return Timings(created_at=_iso(created), started_at=_iso(started), finished_at=_iso(ended),
                   queued_s=round(max(0.0, queued_s), 6), run_s=None if run_s is None else round(max(0.0, run_s), 6))


def _links(jid: str, finished: bool) -> JobLinks:
    return JobLinks(self=f"/audits/{jid}", report=f"/audits/{jid}/report" if finished else None,
                    report_html=f"/audits/{jid}/report.html" if finished else None)


def job_summary_out(job: JobSummary, now: float) -> JobSummaryOut:
    """A ``JobStore.summaries`` item as a list item; ``passed`` as in ``job_out`` (the stored gate)."""
    summary = job.spec_summary or {}
    return JobSummaryOut(
        id=job.id, kind=job.kind, status=job.status, progress=float(job.progress or 0.0), stage=job.stage or "",
        timings=_timings(job.created_at, job.started_at, job.finished_at, now), error=_error(job),
        verdict=job.verdict, passed=_gate(job, summary.get("require")), spec=SpecSummary(**summary),
        links=_links(job.id, job.status == JobStatus.SUCCEEDED))


def job_out(job: Job, now: float) -> JobOut:
    """The job as ``GET /audits/{id}`` (and every answer that shows a job) serializes it."""
    return JobOut(
        id=job.id, kind=job.kind, status=job.status, progress=float(job.progress or 0.0), stage=job.stage or "",
        attempts=int(job.attempts), timeout_s=float(job.timeout_s),
        timings=_timings(job.created_at, job.started_at, job.finished_at, now),
        error=_error(job),
        verdict=job.verdict,
        passed=_gate(job, job.spec.get("require")),
        inputs={k: InputFile(**v) for k, v in job.inputs.items() if isinstance(v, dict)},
        spec=job.spec,
        links=_links(job.id, job.status == JobStatus.SUCCEEDED),
        write_back=write_back_view(job),
    )
