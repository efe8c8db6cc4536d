"""``/audit`` and ``/audits``: submit, follow, read, list, cancel and delete audit jobs."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from flask import Blueprint, Response, jsonify, request, send_file
from pydantic import BaseModel, ValidationError

from ..engine.errors import SpecError
from ..engine.schema import Report
from ..jobs import submission
from ..jobs.pages import page_path, served_page, store_page
from ..jobs.states import JobKind, JobStatus
from ..jobs.store import Job, QueueFull, TenantLimit, TenantStoredLimit
from ..jobs.write_back import write_back_request
from ..engine.spec import AuditSpec, parse_audit_spec
from .state import current_tenant, state
from .errors import (DISK_FULL_DETAIL, BadRequest, Conflict, InsufficientStorage, NotFound, PayloadTooLarge,
                     TooManyRequests, Unprocessable)
from .schemas import JobList, ListQuery, SubmitForm, SubmitQuery, job_out, job_summary_out
from .registry_source import REGISTRY_FIELDS, check_write_back, pop_registry_fields, stage_registry_model
from .uploads import (array_kind, check_data_named, check_slot, save_model_data, save_upload, symmetrize_in_sandbox,
                      validate_model)

bp = Blueprint("audits", __name__)
#: repeated file parts: the model's ONNX external data files, each part's file name the location the graph gives it
DATA_FIELD = "model_data"

def parse_model(model: type[BaseModel], data: dict, error: type = BadRequest) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise error(f"Expected a valid `{field}`: {first['msg']}", field=field or None) from None


def _json(model: BaseModel, status: int = 200, headers: dict | None = None) -> Response:
    response = Response(model.model_dump_json(), status=status, mimetype="application/json")
    for k, v in (headers or {}).items():
        response.headers[k] = v
    return response


def get_job_or_404(job_id: str, kind: JobKind | None = None) -> Job:
    job = state().store.get(job_id, tenant=current_tenant())
    if job is None or (kind is not None and job.kind != kind.value):
        raise NotFound(f"no audit with id {job_id!r}; list yours with GET /audits")
    return job


def too_many(exc: QueueFull) -> TooManyRequests:
    """The 429 of a full queue or of a tenant at its limit, with a Retry-After estimate."""
    st = state()
    retry = {"Retry-After": str(submission.retry_after_s(st.store, st.settings))}
    if isinstance(exc, TenantStoredLimit):  # waiting frees nothing here: deleting does
        return TooManyRequests(f"you keep {exc.depth} audits, the most one tenant may keep (AUDIT_MAX_TENANT_STORED="
                               f"{exc.limit}; answers reused from a finished audit count too); delete some with "
                               f"DELETE /audits/{{id}} and submit again", headers={"Retry-After": "3600"},
                               slug="tenant-quota")
    if isinstance(exc, TenantLimit):
        return TooManyRequests(f"you have {exc.depth} audits queued or running, the most one tenant may have at "
                               f"once (AUDIT_MAX_TENANT_JOBS={exc.limit}); retry after the Retry-After seconds, or "
                               f"cancel some with DELETE /audits/{{id}}", headers=retry, slug="tenant-limit")
    return TooManyRequests(f"the queue is full ({exc.depth} jobs waiting, limit {exc.limit}); retry after the "
                           f"Retry-After seconds", headers=retry)


@contextmanager
def submission_errors() -> Iterator[None]:
    """The jobs layer's submission errors as problem+json: 429, 507 and 422."""
    try:
        yield
    except QueueFull as exc:
        raise too_many(exc) from None
    except submission.DiskFull as exc:
        raise InsufficientStorage(f"{DISK_FULL_DETAIL} ({exc.free_mb:.0f} MiB free, AUDIT_MIN_FREE_MB="
                                  f"{exc.min_free_mb})", headers={"Retry-After": "60"}) from None
    except submission.InvalidSubmission as exc:
        raise Unprocessable(exc.message, field=exc.field) from None


MiB = 1024 * 1024
MAX_SPEC_DEPTH = 32
#: the longest spec accepted (a large permutation group's generators fit many times over)
MAX_SPEC_CHARS = 64 * 1024


def _no_constant(name: str) -> Any:
    raise SpecError(f"Expected finite JSON numbers, but the spec contains {name}", field="spec")


def load_spec_json(text: str) -> Any:
    """The spec's JSON, refusing NaN / Infinity literals and nesting deeper than ``MAX_SPEC_DEPTH``
    (deep nesting would exhaust the parser's recursion) with a ``SpecError`` that says so."""
    depth = level = 0
    in_string = escaped = False
    for ch in text:  # bracket depth outside strings, before the recursive parser sees it
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            level += 1
            depth = max(depth, level)
            if depth > MAX_SPEC_DEPTH:
                raise SpecError(f"Expected a spec nested at most {MAX_SPEC_DEPTH} levels deep, but it is deeper",
                                field="spec")
        elif ch in "]}":
            level -= 1
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise SpecError(f"Expected a JSON object, but the text does not parse: {exc}", field="spec") from None


@bp.post("/audit")
def submit_audit() -> Response:
    st, tenant = state(), current_tenant()
    query = parse_model(SubmitQuery, request.args.to_dict())
    if not request.mimetype == "multipart/form-data":
        raise BadRequest("Expected a multipart/form-data body with a `model` file and a `spec` field, but got "
                         f"{request.mimetype or 'no body'}; e.g. curl -F model=@model.onnx -F 'spec={{\"group\":\"C4\"}}'")
    staged: dict[str, Path] = {}  # field -> private staging file; adopted into the store only when accepted
    with submission_errors():
        submission.admit(st.store, st.settings, tenant)  # cheap early checks before reading the upload
        options, spec, registry_fields = _parse_form()
        check_write_back(st.settings, tenant, registry_fields)  # the operator's rules, before any download
        submission.check_device(spec, st.settings)
        try:
            inputs = _stage_inputs(st, tenant, spec, registry_fields, staged)
            # a write-back is this job's own work (the worker does it): never answered by a finished twin
            write_back = "mlflow" in inputs["model"]
            done = submission.submit(st.store, st.blobs, st.settings, tenant, submission.Submission(
                spec=spec.model_dump(mode="json", exclude_none=False), inputs=inputs, staged=staged,
                timeout_s=options.timeout_s, reuse=options.reuse and not write_back))
        finally:
            for path in staged.values():
                path.unlink(missing_ok=True)
    job = done.job
    if not done.reused:
        st.executor.dispatch(job)
    location = f"/audits/{job.id}"
    wait = min(query.wait, st.settings.max_wait_s)
    job = submission.wait_for(st.store, job, wait)
    if wait > 0 and job.status == JobStatus.SUCCEEDED:
        return _waited_answer(job, location)
    return _json(job_out(job, time.time()), 202, {"Location": location})


def _parse_form() -> tuple[SubmitForm, AuditSpec, dict[str, Any]]:
    """The non-file fields of ``POST /audit``: the options, the validated spec and the registry fields."""
    # an empty file input (Swagger UI's "Try it out", an HTML form) arrives as a part with no file name and no
    # bytes: absent, as the client meant (issue 23)
    form = {k: v for k, v in request.form.items()
            if k != "spec" and not (v == "" and k in (*submission.FILE_FIELDS, DATA_FIELD, *REGISTRY_FIELDS))}
    names = {str(k) for k in form} | {str(k) for k in request.files}
    unknown = sorted(names - {"timeout_s", "reuse", "spec", *submission.FILE_FIELDS, DATA_FIELD, *REGISTRY_FIELDS})
    if unknown:
        raise BadRequest(f"Expected only the fields model (with model_data, or model_uri, mlflow_registry, "
                         f"mlflow_write_back), spec, probes, labels, second_probes, timeout_s, reuse, but got "
                         f"{', '.join(unknown)}", field=unknown[0])
    if DATA_FIELD in form:
        raise Unprocessable("Expected `model_data` parts to be files named by the location the model's graph gives "
                            "them (e.g. -F model_data=@model.onnx.data), but got a plain form field", field=DATA_FIELD)
    registry_fields = pop_registry_fields(form)  # model_uri: the model comes from an allowed MLflow registry
    options = parse_model(SubmitForm, form, Unprocessable)

    spec_text = request.form.get("spec")
    if spec_text is None and "spec" in request.files:
        spec_text = request.files["spec"].read(1024 * 1024).decode("utf-8", errors="replace")
    if spec_text is None:
        raise BadRequest('Expected a `spec` form field with the audit spec JSON (e.g. {"group": "C4"}), but got none',
                         field="spec")
    if len(spec_text) > MAX_SPEC_CHARS:  # every job stores its spec, and every list page carries it
        raise PayloadTooLarge(f"Expected a spec of at most {MAX_SPEC_CHARS // 1024} KiB (a spec is a few KiB; give "
                              f"probes as files, not in the spec), but got {len(spec_text)} characters", field="spec")
    try:
        spec = parse_audit_spec(load_spec_json(spec_text))
    except SpecError as exc:
        field = exc.field if exc.field in (None, "spec") else f"spec.{exc.field}"
        raise Unprocessable(exc.message, field=field) from None
    if "model" not in request.files and not registry_fields.get("model_uri"):
        raise BadRequest("Expected a `model` file part (ONNX or TorchScript), but got none", field="model")
    return options, spec, registry_fields


def _stage_inputs(st: Any, tenant: str, spec: AuditSpec, registry_fields: dict[str, Any],
                  staged: dict[str, Path]) -> dict[str, dict]:
    """Stream the file parts (or the registry's model) into ``staged`` and check them; the model check in
    the sandbox also fits the spec, probes and labels to the model: a 422 naming the field now, never a job
    that fails later. Returns the input entries; a ``model_uri`` with ``mlflow_write_back`` carries the
    write-back request in ``inputs.model.mlflow`` (the worker writes back, ``jobs.write_back``)."""
    inputs: dict[str, dict] = {}
    probe_shape = None
    write_back: dict | None = None
    data_uploads = request.files.getlist(DATA_FIELD)
    for name in ("probes", "labels", "second_probes", "model"):
        upload = request.files.get(name)
        if name == "model" and registry_fields.get("model_uri"):
            if data_uploads:
                raise BadRequest("Expected `model_data` parts only with a `model` upload, but got them with a "
                                 "`model_uri` (the service fetches the data files from the registry)", field=DATA_FIELD)
            inputs[name], located, registry_name, data = stage_registry_model(st, registry_fields, upload is not None,
                                                                              staged)
            inputs.update(data)
            if registry_fields.get("mlflow_write_back"):
                write_back = write_back_request(located, registry_name)
            continue
        if upload is None:
            continue
        cap = st.settings.max_model_mb if name == "model" else st.settings.max_probes_mb
        entry, staged[name] = save_upload(st.blobs, upload, name, cap)
        if name != "model":
            entry["format"], shape = array_kind(staged[name], name, cap * MiB)
            if name == "probes" and shape is not None and len(shape) >= 2:
                probe_shape = tuple(shape[1:])
        inputs[name] = entry
    if data_uploads:  # the model's external data files, under what the model left of the model cap
        if "model" not in inputs:
            raise BadRequest("Expected `model_data` parts with a `model` file part, but got no model", field=DATA_FIELD)
        room = st.settings.max_model_mb * MiB - inputs["model"]["size_bytes"]
        inputs.update(save_model_data(st.blobs, data_uploads, room, st.settings.max_model_mb, staged))
    submission.check_inputs(spec, inputs)
    files = {n: (staged[n], inputs[n]["format"], inputs[n]["sha256"]) for n in inputs
             if n in submission.FILE_FIELDS and n != "model"}
    data = {name: (staged[submission.DATA_PREFIX + name], entry["sha256"])
            for name, entry in submission.data_inputs(inputs).items()}
    inputs["model"], named = validate_model(staged["model"], inputs["model"], st.settings, probe_shape,
                                            spec=spec.model_dump(mode="json", exclude_none=False), files=files,
                                            tenant=tenant, active=st.store.count_active(tenant), data=data)
    if registry_fields.get("model_uri"):  # the registry's folder held more than the graph names: not kept
        for name in sorted(set(data) - set(named)):
            inputs.pop(submission.DATA_PREFIX + name)
            staged.pop(submission.DATA_PREFIX + name).unlink(missing_ok=True)
    else:
        check_data_named(inputs, named)
    if write_back is not None:
        inputs["model"]["mlflow"] = write_back
    return inputs


def _stored_report(job_id: str) -> Report | None:
    """A finished audit's report, typed; one this release's models refuse (stored by an older release, or the
    holder of a reused duplicate) is a 409 that points at the JSON, which is served as stored."""
    try:
        return state().store.report(job_id)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise Conflict(f"audit {job_id}'s stored report does not match this release's report models "
                       f"({first['loc']}: {first['msg']}); GET /audits/{job_id}/report serves it as stored") from None


def _waited_answer(job: Job, location: str) -> Response:
    """A finished ``?wait=`` audit: the compact summary (verdict first, headline metrics, links); the full
    report is at ``links.report``. ``Accept: text/html`` gets the HTML report instead. The stored report is read
    by the models only for the summary: the page is served from disk, and where it is missing ``get_report_html``
    reads the report and answers a refused one with the same 409."""
    from ..engine.report.summary import report_summary

    if request.accept_mimetypes.best == "text/html":
        response = get_report_html(job.id)
    else:
        report = _stored_report(job.id)
        if report is None:
            raise Conflict(f"audit {job.id} has no stored report")
        response = jsonify(report_summary(report, job.id))
    response.headers["Location"] = location
    response.headers["Vary"] = "Accept"
    return response


@bp.get("/audits")
def list_audits() -> Response:
    query = parse_model(ListQuery, request.args.to_dict())
    rows, total = state().store.summaries(tenant=current_tenant(), limit=query.limit, offset=query.offset,
                                          status=query.status)
    now = time.time()
    nxt = None
    if query.offset + len(rows) < total:
        nxt = f"/audits?limit={query.limit}&offset={query.offset + query.limit}"
        if query.status is not None:
            nxt += f"&status={query.status.value}"
    return _json(JobList(items=[job_summary_out(r, now) for r in rows], total=total, limit=query.limit,
                         offset=query.offset, next=nxt))


@bp.get("/audits/<job_id>")
def get_audit(job_id: str) -> Response:
    return _json(job_out(get_job_or_404(job_id), time.time()))


def _finished_job(job_id: str) -> Job:
    """The job, when it succeeded; 409 saying where it stands otherwise."""
    job = get_job_or_404(job_id)
    if job.status != JobStatus.SUCCEEDED:
        if job.status == JobStatus.FAILED:
            reason = job.error.message if job.error is not None else ""
            raise Conflict(f"audit {job_id} failed, so it has no report: {reason}")
        raise Conflict(f"audit {job_id} is {job.status.value} ({job.progress:.0%}, {job.stage}); its report is "
                       f"ready when GET /audits/{job_id} says succeeded")
    return job


@bp.get("/audits/<job_id>/report")
def get_report(job_id: str) -> Response:
    """The stored report JSON, streamed from the database in slices (memory per download: one slice)."""
    best = request.accept_mimetypes.best_match(["application/json", "text/html"], default="application/json")
    if best == "text/html" and request.accept_mimetypes["text/html"] > request.accept_mimetypes["application/json"]:
        return get_report_html(job_id)
    _finished_job(job_id)
    store = state().store
    source = store.report_source(job_id)
    if source is None:
        raise Conflict(f"audit {job_id} has no stored report")
    holder, size = source
    response = Response(store.report_slices(holder), mimetype="application/json")
    response.headers["Content-Length"] = str(size)
    response.headers["Vary"] = "Accept"
    return response


@bp.get("/audits/<job_id>/report.html")
def get_report_html(job_id: str) -> Response:
    """The page the worker rendered when the job finished, read from disk; a page that is missing (a
    duplicate, an older job, a render past its budget) is rendered once off the event loop and kept."""
    st = state()
    path = page_path(st.settings.data_dir, job_id)
    job = _finished_job(job_id)
    if not path.is_file() and job.kind == JobKind.AUDIT.value:  # a reference run's card has no page
        report = _stored_report(job_id)
        if report is not None:
            _off_the_loop(store_page, st.settings.data_dir, job, report)
    if not path.is_file():
        raise Conflict(f"audit {job_id}'s report page could not be rendered; GET /audits/{job_id}/report has the "
                       f"report as JSON")
    response = Response(served_page(path, request.host_url), mimetype="text/html")  # a page is < 1 MiB
    response.headers["Vary"] = "Accept"
    return response


def _off_the_loop(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a native thread when gevent runs the app (its hub waits without blocking other
    requests), else here."""
    try:
        from gevent import get_hub, monkey
    except ImportError:
        return fn(*args)
    if not monkey.is_module_patched("threading"):
        return fn(*args)
    return get_hub().threadpool.apply(fn, args)


@bp.get("/audits/<job_id>/symmetrized.onnx")
def get_symmetrized(job_id: str) -> Response:
    """The orbit-averaged (genuinely invariant) model of a finished audit, built in the sandbox: 409 until
    the audit succeeded, 422 when its group is not exact or the model has no torch twin."""
    st, tenant = state(), current_tenant()
    job = get_job_or_404(job_id, JobKind.AUDIT)
    if job.status != JobStatus.SUCCEEDED:
        raise Conflict(f"audit {job_id} is {job.status.value}; its symmetrized model is ready when GET "
                       f"/audits/{job_id} says succeeded")
    built = symmetrized_path(st.settings, job.id)
    if not built.is_file():  # built once, in the sandbox; every download after streams the stored file
        model = st.blobs.path(job.inputs["model"]["sha256"])
        files = {name: st.blobs.path(entry["sha256"]) for name, entry in submission.data_inputs(job.inputs).items()}
        with check_slot(st.settings, tenant, st.store.count_active(tenant)):
            symmetrize_in_sandbox(model, job.spec, st.settings, built, files)
    return send_file(built, mimetype="application/octet-stream", as_attachment=True,
                     download_name=f"audit-{job.id}-symmetrized.onnx", conditional=False, etag=False)


def symmetrized_path(settings: Any, job_id: str) -> Path:
    """Where a job's symmetrized model is kept once built (removed with the job)."""
    return Path(settings.data_dir) / "symmetrized" / f"{job_id}.onnx"


@bp.delete("/audits/<job_id>")
def delete_audit(job_id: str) -> Response:
    st = state()
    job = get_job_or_404(job_id)
    if not job.ready and st.store.cancel(job_id, tenant=current_tenant()):
        return _json(job_out(st.store.get(job_id) or job, time.time()), 202)
    if st.store.delete(job_id, tenant=current_tenant()):
        symmetrized_path(st.settings, job_id).unlink(missing_ok=True)
        page_path(st.settings.data_dir, job_id).unlink(missing_ok=True)
        shas = [e["sha256"] for e in job.inputs.values() if isinstance(e, dict) and e.get("sha256")]
        st.blobs.remove_unreferenced(shas, st.store.references_blob)  # blobs no other job refers to
        return Response(status=204)
    raise NotFound(f"no audit with id {job_id!r}")
