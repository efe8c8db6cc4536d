"""``/references``: the paper's reference runs (cards, model downloads) and retraining them as a job."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request, send_file

from ..jobs.states import JobKind
from ..jobs.store import QueueFull
from .state import current_tenant, state
from .audits import _json, parse_model, too_many
from .errors import BadRequest, Forbidden, NotFound, ServiceUnavailable, Unprocessable
from .schemas import ReferenceRunRequest, job_out

bp = Blueprint("references", __name__)

FORMATS = {"onnx": ("model.onnx", "application/octet-stream"), "torchscript": ("model.pt", "application/octet-stream")}


def _catalog() -> Any:
    try:
        from ..reference import catalog
    except ImportError as exc:
        raise ServiceUnavailable(f"reference runs are not available in this installation ({exc})") from None
    return catalog


def _card(catalog: Any, name: str) -> dict:
    try:
        card = catalog.get_reference_run(name)
    except KeyError:
        names = ", ".join(r.get("name", "?") for r in catalog.list_reference_runs())
        raise NotFound(f"no reference run named {name!r}; known: {names}") from None
    return _with_links(dict(card), name)


def _with_links(card: dict, name: str) -> dict:
    links = dict(card.get("links") or {})
    links.update({"self": f"/references/{name}", "runs": f"/references/{name}/runs"})
    links.update({f"model_{fmt}": f"/references/{name}/model.{fmt}" for fmt in FORMATS})
    card["links"] = links
    card.setdefault("name", name)
    return card


@bp.get("/references")
def list_references() -> Response:
    catalog = _catalog()
    items = [_with_links(dict(r), r.get("name", "")) for r in catalog.list_reference_runs()]
    return jsonify({"items": items})


@bp.get("/references/<name>")
def get_reference(name: str) -> Response:
    return jsonify(_card(_catalog(), name))


@bp.get("/references/<name>/model.<fmt>")
def download_reference_model(name: str, fmt: str) -> Response:
    catalog = _catalog()
    _card(catalog, name)
    if fmt not in FORMATS:
        raise NotFound(f"Expected a model format in {', '.join(FORMATS)}, but got {fmt!r}")
    try:
        path = catalog.reference_model_path(name, fmt)
    except (KeyError, ValueError) as exc:
        raise NotFound(f"no {fmt} model for reference run {name!r}: {exc}") from None
    if not path.is_file():
        raise NotFound(f"reference run {name!r} has no trained {fmt} model yet; train it with "
                       f"POST /references/{name}/runs")
    return send_file(path, mimetype=FORMATS[fmt][1], as_attachment=True, download_name=f"{name}.{path.suffix.lstrip('.')}")


@bp.post("/references/<name>/runs")
def train_reference(name: str) -> Response:
    st = state()
    _card(_catalog(), name)
    if not current_app.extensions["audit_auth"].is_admin(current_tenant()):
        raise Forbidden(f"retraining a reference run costs minutes of CPU on the shared workers; tenant "
                        f"{current_tenant()!r} is not in AUDIT_ADMIN_TENANTS")
    body: Any = {}
    if request.content_length:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise BadRequest('Expected a JSON object body such as {"epochs": 5, "seed": 0}, or no body')
    params = parse_model(ReferenceRunRequest, body, Unprocessable)
    spec = {"name": name, "epochs": params.epochs, "seed": params.seed}
    try:
        job = st.store.create(kind=JobKind.REFERENCE_RUN, spec=spec, inputs={},
                              timeout_s=st.settings.job_timeout_s, max_attempts=st.settings.max_attempts,
                              tenant=current_tenant(), max_queued=st.settings.max_queued,
                              max_tenant_jobs=st.settings.max_tenant_jobs, queue=st.settings.default_queue)
    except QueueFull as exc:
        raise too_many(exc) from None
    st.executor.dispatch(job)
    return _json(job_out(job, time.time()), 202, {"Location": f"/audits/{job.id}"})
