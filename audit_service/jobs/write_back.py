"""The MLflow write-back of an audit submitted with ``mlflow_write_back=true``, done by the worker, under the
operator's rules.

Which tenant may write back to which registered models is the operator's (``WriteBackPolicy``):
``AUDIT_WRITE_BACK_RULES`` / ``AUDIT_WRITE_BACK_RULES_FILE`` entries ``tenant:pattern`` or
``tenant:registry:pattern`` (a glob over the registered model's name; ``runs:/RUN_ID`` for a run), checked at
submission (403 otherwise) and again by the worker before it writes. The ``passed`` tag is the operator's gate
(``AUDIT_WRITE_BACK_REQUIRE``, ``AUDIT_WRITE_BACK_REQUIRE_CONFIDENT``), never the client's ``require``; the
client's gate is kept beside it (``client_require``), and the tags name the tenant and the job.

Why the worker: the request is stored with the job (``inputs.model.mlflow``, written at submission), so it
survives what a thread of the web process would not (a restarted or recycled web worker, another web worker
answering the poll); the worker writes back before it records the job as succeeded, so a worker that dies
in between leaves a job that is run again, write-back included. The outcome is part of the report
(``report.mlflow_write_back``): a registry that is down costs the tags, never the audit.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..engine.schema import Report, Verdict
from ..engine.spec import VERDICT_LABELS
from .settings import Settings, read_operator_file
from .store import Job

log = logging.getLogger("audit_service.jobs")

#: attempts at the registry, with 1 s, 2 s pauses between them
ATTEMPTS = 3


TAG_PREFIX = "invariance."


class WriteBackConfigError(ValueError):
    """``AUDIT_WRITE_BACK_*`` is malformed (the message says which entry and why)."""


@dataclass(frozen=True)
class WriteBackRule:
    tenant: str
    registry: str  # ``*``: any allowed registry
    pattern: str  # glob over the model name (``models:/NAME``) or ``runs:/RUN_ID``

    def permits(self, tenant: str, registry: str, target: str) -> bool:
        return (self.tenant == tenant and fnmatch.fnmatchcase(registry, self.registry)
                and fnmatch.fnmatchcase(target, self.pattern))


@dataclass(frozen=True)
class WriteBackPolicy:
    """The operator's write-back rules and gate (``from_settings``); no rule: no tenant may write back."""

    rules: tuple[WriteBackRule, ...]
    require: tuple[str, ...]
    require_confident: bool

    @classmethod
    def from_settings(cls, settings: Settings) -> "WriteBackPolicy":
        rules = list(parse_rules(settings.write_back_rules, "AUDIT_WRITE_BACK_RULES"))
        if settings.write_back_rules_file:
            path = settings.write_back_rules_file
            text = read_operator_file(path, "AUDIT_WRITE_BACK_RULES_FILE", WriteBackConfigError)
            rules += parse_rules(text, f"AUDIT_WRITE_BACK_RULES_FILE {path}")
        require = tuple(r.strip() for r in settings.write_back_require.split(",") if r.strip())
        unknown = [r for r in require if r not in VERDICT_LABELS]
        if not require or unknown:
            labels = ", ".join(VERDICT_LABELS)
            raise WriteBackConfigError(f"Expected AUDIT_WRITE_BACK_REQUIRE to list verdict labels ({labels})"
                                       f", but got {settings.write_back_require[:200]!r}")
        return cls(tuple(rules), require, bool(settings.write_back_require_confident))

    def permits(self, tenant: str, registry: str, target: str) -> bool:
        return any(rule.permits(tenant, registry, target) for rule in self.rules)

    def passed(self, verdict: Verdict) -> bool | None:
        """The operator's gate on a report's verdict (``engine.verdict.gate`` with the operator's labels)."""
        from ..engine.verdict import gate

        return gate(verdict.label, self.require, verdict.borderline, self.require_confident)


def parse_rules(text: str, source: str) -> list[WriteBackRule]:
    """``tenant:pattern`` / ``tenant:registry:pattern`` entries, separated by commas or lines (``#`` comments)."""
    rules = []
    entries = [e.strip() for line in text.splitlines() for e in line.split("#", 1)[0].split(",")]
    for n, entry in enumerate(e for e in entries if e):
        tenant, _, rest = entry.partition(":")
        rest = rest.strip()
        if rest.startswith("runs:"):  # `tenant:runs:/RUN_ID`: the run is the pattern, in any registry
            parts = [tenant.strip(), "*", rest]
        else:
            parts = [p.strip() for p in entry.split(":", 2)]
        if len(parts) == 2:
            parts.insert(1, "*")
        if len(parts) != 3 or not all(parts):
            raise WriteBackConfigError(f"Expected entries `tenant:pattern` or `tenant:registry:pattern` in {source}, "
                                       f"but entry {n + 1} ({entry[:80]!r}) has an empty or missing part")
        rules.append(WriteBackRule(*parts))
    return rules


def write_back_target(uri: str) -> str:
    """What a rule's pattern matches: the registered model's name of ``models:/NAME/...`` (or ``@ALIAS``),
    ``runs:/RUN_ID`` of a run."""
    if uri.startswith("models:/"):
        return uri[len("models:/"):].split("/", 1)[0].split("@", 1)[0]
    if uri.startswith("runs:/"):
        return "runs:/" + uri[len("runs:/"):].split("/", 1)[0]
    return uri


def write_back_request(located: Any, registry_name: str) -> dict[str, Any]:
    """What the worker needs to write back to the model ``located`` at submission (``Located`` of
    ``mlflow_registry``): the version an alias named then, not the one it names when the audit ends."""
    return {"registry": registry_name, "uri": located.ref.uri, "directory": located.directory,
            "file": located.file, "flavor": located.flavor, "version": located.version, "run_id": located.run_id}


def requested(job: Job) -> dict[str, Any] | None:
    """The job's write-back request, or None."""
    model = job.inputs.get("model") or {}
    request = model.get("mlflow")
    return request if isinstance(request, dict) else None


def operator_tags(report: Report, policy: WriteBackPolicy, tenant: str, job_id: str) -> dict[str, str]:
    """The tags that replace the report's own gate: ``passed`` by the operator's gate, the gate itself, the
    client's ``require`` beside it (for the record), and who asked (tenant) for which audit (job)."""
    verdict = report.verdict
    return {
        TAG_PREFIX + "passed": "true" if policy.passed(verdict) else "false",
        TAG_PREFIX + "require": ",".join(policy.require),
        TAG_PREFIX + "require_confident": "true" if policy.require_confident else "false",
        TAG_PREFIX + "gate": "operator",
        TAG_PREFIX + "client_require": ",".join(verdict.require)[:500],
        TAG_PREFIX + "tenant": str(tenant)[:250],
        TAG_PREFIX + "job_id": str(job_id)[:250],
    }


def write_back(request: dict[str, Any], report: Report, settings: Settings, pause_s: float = 1.0,
               before_attempt: Callable[[], bool] = lambda: True, tenant: str = "default",
               job_id: str = "") -> dict[str, Any]:
    """Tag the audited model version (or run) with ``report``'s verdict, ``passed`` by the operator's gate
    (``operator_tags``), and log the reports (see ``Registry.write_back``); ``{"status": "written", "tags": ...}``
    or ``{"status": "failed", "error": ...}``. The operator's rules are read again here: a tenant no longer
    allowed writes nothing. ``before_attempt`` runs before each try at the registry (the worker renews the
    job's lease there); when it says False the job is no longer ours (cancelled) and nothing is written."""
    from ..adapters.mlflow_registry import Located, Registry, parse_allowed, parse_model_uri
    from ..engine.report.html import render_report_html
    from .failures import cap_text

    tracking = parse_allowed(settings.mlflow_allowed_uris).get(str(request.get("registry")))
    target = {"uri": request.get("uri"), "version": request.get("version")}
    if tracking is None:
        return {"status": "failed", **target, "attempts": 0,
                "error": f"the registry {str(request.get('registry'))[:80]!r} is no longer in this worker's "
                         "AUDIT_MLFLOW_ALLOWED_URIS"}
    try:
        policy = WriteBackPolicy.from_settings(settings)
    except WriteBackConfigError as exc:
        return {"status": "failed", **target, "attempts": 0, "error": f"the operator's write-back rules: {exc}"}
    name = write_back_target(str(request.get("uri")))
    if not policy.permits(tenant, str(request.get("registry")), name):
        return {"status": "failed", **target, "attempts": 0,
                "error": f"tenant {tenant!r} may no longer write back to {name[:120]!r} (the operator's "
                         f"AUDIT_WRITE_BACK_RULES)"}
    overrides = operator_tags(report, policy, tenant, job_id)
    error = "not attempted"
    for attempt in range(1, ATTEMPTS + 1):
        if not before_attempt():
            return {"status": "failed", **target, "attempts": attempt - 1,
                    "error": "the job was cancelled or taken back before its verdict was written"}
        try:
            located = Located(ref=parse_model_uri(str(request["uri"])), directory=str(request["directory"]),
                              file=str(request["file"]), flavor=str(request["flavor"]),
                              version=request.get("version"), run_id=request.get("run_id"))
            tags = Registry(tracking, proxied_only=True).write_back(located, report, render_report_html(report),
                                                                    overrides=overrides)
            return {"status": "written", **target, "attempts": attempt, "tags": tags}
        except Exception as exc:  # noqa: BLE001 - the registry's failure is reported, the audit stands
            error = cap_text(f"{type(exc).__name__}: {exc}")
            log.warning("MLflow write-back to %s failed (attempt %d of %d): %s", target["uri"], attempt, ATTEMPTS,
                        error)
            if attempt < ATTEMPTS:
                time.sleep(pause_s * 2 ** (attempt - 1))
    return {"status": "failed", **target, "attempts": ATTEMPTS, "error": error}
