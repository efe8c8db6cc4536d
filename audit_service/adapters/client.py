"""A small client for a running audit service (pipelines, ``audit-service submit``).

    from audit_service.adapters.client import AuditClient

    client = AuditClient("http://127.0.0.1:8000")
    job = client.submit("model.onnx", {"group": "C4"}, probes="probes.npz")
    job = client.wait(job["id"], progress=lambda j: print(j["progress"], j["stage"]))
    report = client.report(job["id"])          # raises JobFailed if the audit failed
    if report["verdict"]["label"] in {"genuine", "learned"}: ...

Errors the service answers (problem+json) raise ``ServiceError`` with ``status``, ``detail`` and
``field``; a 429 is retried after its ``Retry-After`` (up to ``max_retries``).
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import requests

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class ServiceError(Exception):
    """The service answered with an error (``status``, RFC 9457 ``problem``), or could not be reached
    (``status`` 0)."""

    def __init__(self, status: int, detail: str, field: str | None = None, problem: dict | None = None) -> None:
        super().__init__(f"{status}: {field + ': ' if field else ''}{detail}" if status else detail)
        self.status, self.detail, self.field, self.problem = status, detail, field, problem or {}


class JobFailed(Exception):
    def __init__(self, job: dict) -> None:
        err = job.get("error") or {}
        super().__init__(f"audit {job.get('id')} {job.get('status')}: {err.get('message', 'no reason given')}")
        self.job = job


class AuditClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 60.0, token: str | None = None,
                 session: requests.Session | None = None, max_retries: int = 5) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = session or requests.Session()
        self.max_retries = max_retries
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"

    # ------------------------------------------------------------------ plumbing
    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        rewind = kwargs.pop("_rewind", None)
        for attempt in range(self.max_retries + 1):
            try:
                response = self.session.request(method, self.url + path, **kwargs)
            except requests.RequestException as exc:
                raise ServiceError(0, f"could not reach the audit service at {self.url}: {exc}") from None
            if response.status_code == 429 and attempt < self.max_retries:
                time.sleep(min(60.0, float(response.headers.get("Retry-After", "5") or 5)))
                if rewind:
                    rewind()
                continue
            break
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"detail": response.text[:500]}
            raise ServiceError(response.status_code, str(problem.get("detail") or problem.get("title") or response.reason),
                               problem.get("field"), problem)
        return response

    # ------------------------------------------------------------------ API
    def submit(self, model: str | Path, spec: dict | str, probes: str | Path | None = None,
               labels: str | Path | None = None, second_probes: str | Path | None = None,
               timeout_s: float | None = None, wait: float | None = None) -> dict:
        """POST /audit; returns the job (202) or, with ``wait`` and a quick audit, ``{"summary": ..., "report": ...}``."""
        spec_text = spec if isinstance(spec, str) else json.dumps(spec)
        files_in = {"model": model, "probes": probes, "labels": labels, "second_probes": second_probes}
        with ExitStack() as stack:
            handles = {k: stack.enter_context(open(v, "rb")) for k, v in files_in.items() if v is not None}
            data_files = [(name, stack.enter_context(open(Path(model).parent / name, "rb")))
                          for name in external_data_files(model)]

            def rewind() -> None:
                for fh in [*handles.values(), *(fh for _, fh in data_files)]:
                    fh.seek(0)

            files: list[tuple[str, tuple]] = [(k, (Path(files_in[k]).name, fh, "application/octet-stream"))
                                              for k, fh in handles.items()]
            files += [("model_data", (name, fh, "application/octet-stream")) for name, fh in data_files]
            data: dict[str, str] = {"spec": spec_text}
            if timeout_s is not None:
                data["timeout_s"] = str(timeout_s)
            params = {"wait": wait} if wait else None
            response = self._request("POST", "/audit", files=files, data=data, params=params, _rewind=rewind,
                                     timeout=max(self.timeout, (wait or 0) + 30))
        body = response.json()
        if response.status_code == 200:  # waited, and the report is ready: the answer is its summary
            job_id = body.get("id") or response.headers.get("Location", "").rsplit("/", 1)[-1]
            return {"id": job_id, "status": "succeeded", "summary": body, "report": self.report(job_id)}
        return body

    def get(self, job_id: str) -> dict:
        return self._request("GET", f"/audits/{job_id}").json()

    def list(self, limit: int = 20, offset: int = 0, status: str | None = None) -> dict:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        return self._request("GET", "/audits", params=params).json()

    def wait(self, job_id: str, progress: Callable[[dict], None] | None = None, poll: float = 0.5,
             timeout: float | None = None) -> dict:
        """Poll until the job is succeeded / failed / cancelled; call ``progress(job)`` on every change."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = None
        while True:
            job = self.get(job_id)
            key = (job["status"], job.get("progress"), job.get("stage"))
            if progress is not None and key != seen:
                progress(job)
            seen = key
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"audit {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll)

    def report(self, job_id: str) -> dict:
        try:
            return self._request("GET", f"/audits/{job_id}/report").json()
        except ServiceError as exc:
            if exc.status == 409:
                job = self.get(job_id)
                if job["status"] in ("failed", "cancelled"):
                    raise JobFailed(job) from None
            raise

    def report_html(self, job_id: str) -> str:
        return self._request("GET", f"/audits/{job_id}/report.html").text

    def delete(self, job_id: str) -> dict | None:
        response = self._request("DELETE", f"/audits/{job_id}")
        return response.json() if response.status_code == 202 else None

    def audit(self, model: str | Path, spec: dict | str, progress: Callable[[dict], None] | None = None,
              timeout: float | None = None, **files: Any) -> dict:
        """Submit, wait and return the report; raises ``JobFailed`` when the audit failed."""
        job = self.submit(model, spec, **files)
        if "report" in job:
            return job["report"]
        job = self.wait(job["id"], progress=progress, timeout=timeout)
        if job["status"] != "succeeded":
            raise JobFailed(job)
        return self.report(job["id"])

    def health(self) -> dict:
        return self._request("GET", "/healthz").json()


def external_data_files(model: str | Path) -> list[str]:
    """The external-data files an ONNX model's graph names (sent beside it as ``model_data`` parts; the service
    checks each name); empty for TorchScript, ``.pt2`` and self-contained ONNX files."""
    with open(model, "rb") as fh:
        if fh.read(2) == b"PK":
            return []
    try:
        import onnx
        from onnx.external_data_helper import _get_all_tensors, uses_external_data

        graph = onnx.load(str(model), load_external_data=False)
    except Exception:  # noqa: BLE001 - not ONNX (or not parseable): the service names the problem
        return []
    names = {entry.value for tensor in _get_all_tensors(graph) if uses_external_data(tensor)
             for entry in tensor.external_data if entry.key == "location"}
    return sorted(names)


def gate(report: dict) -> tuple[bool, str]:
    """(passed, label): the gate the service applied (``verdict.passed``, from the one rule ``verdict.gate`` with
    the audit's ``spec.require``, which ``--require`` sets, and ``spec.require_confident``, which ``--strict``
    sets). The client reads it rather than recomputing it, so it needs nothing of the engine."""
    verdict = report.get("verdict")
    if not isinstance(verdict, dict):  # a stored report the engine would refuse still gets an answer, not a crash
        verdict = {}
    label = str(verdict.get("label", "unknown"))
    return verdict.get("passed") is True, label
