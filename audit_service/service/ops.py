"""Operations: ``/healthz`` (process up), ``/readyz`` (database and data dir usable), ``/metrics``
(Prometheus, computed from the database at scrape time so every gunicorn worker answers the same),
``/openapi.yaml`` (the contract)."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from flask import Blueprint, Response, request

from ..jobs.submission import free_space_mb
from .state import state
from .schemas import HealthOut, ReadyOut

bp = Blueprint("ops", __name__)

DURATION_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))


@bp.get("/healthz")
def healthz() -> Response:
    return Response(HealthOut(status="ok").model_dump_json(), mimetype="application/json")


@bp.get("/readyz")
def readyz() -> Response:
    st = state()
    checks: dict[str, str] = {}
    depth = None
    try:
        depth = st.store.counts_by_status()["queued"]
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - report, do not crash
        checks["database"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
    data_dir = Path(st.settings.data_dir)
    checks["data_dir"] = "ok" if os.access(data_dir, os.W_OK) else f"error: {data_dir} is not writable"
    free_mb = free_space_mb(data_dir)
    checks["disk"] = ("ok" if free_mb is None or free_mb >= st.settings.min_free_mb else
                      f"error: {free_mb:.0f} MiB free in the data dir, less than AUDIT_MIN_FREE_MB="
                      f"{st.settings.min_free_mb}; free some space")
    ok = all(v == "ok" for v in checks.values())
    body = ReadyOut(status="ready" if ok else "not_ready", checks=checks, queue_depth=depth)
    return Response(body.model_dump_json(), status=200 if ok else 503, mimetype="application/json")


@bp.get("/metrics")
def metrics() -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

    st = state()

    class _FromDatabase:
        def collect(self):  # noqa: ANN202
            counts = st.store.counts_by_status()
            jobs = GaugeMetricFamily("audit_jobs", "Jobs in the store by state", labels=["state"])
            for name, n in counts.items():
                jobs.add_metric([name], n)
            yield jobs
            yield GaugeMetricFamily("audit_queue_depth", "Jobs waiting for a worker", value=counts["queued"])
            yield GaugeMetricFamily("audit_queue_limit", "Queued jobs accepted before 429 (AUDIT_MAX_QUEUED)",
                                    value=st.settings.max_queued)
            durations = st.store.durations()
            buckets = []
            for bound in DURATION_BUCKETS:
                buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}",
                                sum(1 for d in durations if d <= bound)))
            yield HistogramMetricFamily("audit_duration_seconds", "Run time of finished audits (last 10k)",
                                        buckets=buckets, sum_value=float(sum(durations)))

    registry = CollectorRegistry()
    registry.register(_FromDatabase())
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST.split(";")[0],
                    headers={"Content-Type": CONTENT_TYPE_LATEST})


def openapi_text() -> str:
    """The contract: the package copy (installed), else the repository's top-level file."""
    try:
        return resources.files("audit_service").joinpath("openapi.yaml").read_text()
    except (FileNotFoundError, OSError):
        return (Path(__file__).resolve().parents[2] / "openapi.yaml").read_text()


@bp.get("/openapi.yaml")
def openapi_yaml() -> Response:
    """``application/yaml`` for tools; a browser (``text/html`` or ``text/plain`` preferred) gets ``text/plain``
    shown inline instead of a download."""
    best = request.accept_mimetypes.best
    mimetype = "text/plain" if best in ("text/html", "text/plain") else "application/yaml"
    response = Response(openapi_text(), mimetype=mimetype)
    response.headers["Content-Disposition"] = 'inline; filename="openapi.yaml"'
    response.headers["Vary"] = "Accept"
    return response
