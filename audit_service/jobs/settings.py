"""Settings shared by the web app and the job workers: defaults, overridden by ``AUDIT_*`` variables.

One frozen dataclass, read once per process (``Settings.from_env()``); the Flask app copies it
into ``app.config`` and tests pass overrides as a mapping. Every field's environment variable is
its upper-cased name with the ``AUDIT_`` prefix (``data_dir`` -> ``AUDIT_DATA_DIR``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping


@dataclass(frozen=True)
class Settings:
    #: where the SQLite database, blobs and job scratch dirs live
    data_dir: Path = Path(".audit-data")
    #: SQLAlchemy URL of the job store; default ``sqlite:///<data_dir>/jobs.sqlite3``
    database_url: str = ""
    #: ``auto`` (``celery`` when ``broker_url`` is set, else ``local``), ``local`` (worker processes
    #: polling the database) or ``celery`` (audits sent to Celery workers through ``broker_url``)
    executor: str = "auto"
    #: Celery broker (``redis://host:6379/0``); setting it switches audits to Celery workers
    broker_url: str = ""
    #: seconds an unacknowledged broker message waits before Redis hands it to another worker
    broker_visibility_s: float = 0.0
    #: queue for audits whose spec does not ask for ``device: cuda`` (``cpu`` or ``gpu``)
    default_queue: str = "cpu"
    #: queues this machine's workers take (comma-separated; empty = all: ``cpu,gpu``)
    worker_queues: str = ""
    #: bearer tokens ``token:tenant,token:tenant`` (or one per line in ``tokens_file``); empty = open
    tokens: str = ""
    tokens_file: str = ""
    #: tenants that may retrain the shared reference runs (comma-separated) when tokens are on
    admin_tenants: str = ""
    #: queued + running jobs one tenant may have before ``POST /audit`` answers 429
    max_tenant_jobs: int = 16
    #: jobs one tenant keeps (any status; duplicates answered from a finished twin included) before
    #: ``POST /audit`` answers 429 ``tenant-quota``: deleting some (``DELETE /audits/{id}``) frees room
    max_tenant_stored: int = 2000
    #: reuse a finished report for an identical submission (same model, spec, probes; per tenant)
    dedupe: int = 1
    #: limits of the sandboxed model check at submission: wall clock (s)
    validate_timeout_s: float = 60.0
    #: whole request body cap (Flask ``MAX_CONTENT_LENGTH``), MiB
    max_upload_mb: int = 512
    #: per-file caps, MiB
    max_model_mb: int = 200
    max_probes_mb: int = 256
    #: hard cap on one stored report's JSON, MiB: past it the saliency examples are dropped, and a report
    #: still larger fails its job (``report_too_large``) instead of being stored
    max_report_mb: int = 8
    #: ``/readyz`` answers 503 and ``POST /audit`` 507 while the data dir's file system has less free space, MiB
    min_free_mb: int = 64
    #: sandboxed model checks at submission running at once, in all (``503`` + Retry-After past it) and per
    #: tenant (``429`` + Retry-After past it); each also counts against ``max_tenant_jobs``
    max_model_checks: int = 4
    max_tenant_checks: int = 2
    #: jobs waiting in the queue before ``POST /audit`` answers 429
    max_queued: int = 64
    #: local audit worker processes (``serve`` / ``worker``)
    workers: int = 1
    #: gunicorn web worker processes (``serve``; gevent: one greenlet per connection, a few KiB each) and
    #: the most connections each holds at once: room for thousands of idle keep-alive clients, each closed
    #: after ``header_timeout_s`` (``serve`` raises the open-file limit to match)
    web_workers: int = 2
    web_connections: int = 4096
    #: connections one client address may hold in each web worker; past it a new one closes that address's
    #: longest-idle kept-alive connection (or is refused when all are busy). 0: no cap (behind a proxy that
    #: caps per client itself, its own address is every client's)
    max_client_connections: int = 256
    #: seconds a client has to send a request's line and headers (and the most a kept-alive connection
    #: waits for the next request); slower clients are disconnected
    header_timeout_s: float = 10.0
    #: seconds any later read or write on a connection (request body, answer) may stall
    request_idle_s: float = 60.0
    #: per-audit limits: wall clock (s), CPU time (s), address space (MiB; 0 = no limit)
    job_timeout_s: float = 3600.0
    job_cpu_s: int = 7200
    job_memory_mb: int = 8192
    #: a running job whose worker has not renewed its lease for this long is taken back
    lease_s: float = 30.0
    #: a job taken back from a lost worker is tried at most this many times in all
    max_attempts: int = 2
    #: upper bound of ``POST /audit?wait=``
    max_wait_s: float = 60.0
    #: how often idle workers look for queued jobs
    poll_s: float = 0.2
    #: ``auto``: the sandbox gets its own network namespace when the kernel allows it (an audit hook
    #: refuses sockets in any case); ``off``: audit hook only
    sandbox_netns: str = "auto"
    #: run TorchScript / ``.pt2`` models even where the kernel cannot confine their file access
    #: (no Landlock); off by default: such uploads are refused with a 422 (fail closed)
    allow_unconfined_models: int = 0
    #: ``auto``: sandboxed children confine their file access with Landlock where the kernel has
    #: it; ``off``: never (then TorchScript / ``.pt2`` need ``allow_unconfined_models``)
    sandbox_landlock: str = "auto"
    #: largest file a sandboxed child may write (RLIMIT_FSIZE), and the cap on its whole work dir, MiB
    job_scratch_mb: int = 512
    #: start sandboxes by forking a process that has imported torch already (``1``) or fresh (``0``)
    warm_sandbox: int = 1
    #: the audit function the sandbox calls, ``module:function``
    engine: str = "audit_service.engine.audit:run_audit"
    #: whether audits may ask for ``device: cuda`` (422 at submission otherwise): ``auto`` (local workers: this
    #: host has an NVIDIA GPU, a CUDA build of torch, and the workers take the ``gpu`` queue; Celery: yes, the
    #: GPU workers run elsewhere), ``1`` or ``0``
    cuda: str = "auto"
    #: host and port for ``audit-service serve``
    host: str = "127.0.0.1"
    port: int = 8000
    extra: dict = field(default_factory=dict, compare=False)
    #: MLflow tracking servers ``POST /audit`` may fetch a ``model_uri`` from: comma-separated ``URI`` or
    #: ``NAME=URI`` (clients name one with ``mlflow_registry``; the first is the default); empty = off
    mlflow_allowed_uris: str = ""
    #: which tenant may write back to which registered models: ``tenant:pattern`` or ``tenant:registry:pattern``
    #: (a glob over the model name, ``runs:/RUN_ID`` for a run), comma- or line-separated, here and/or in
    #: ``write_back_rules_file``; none: no write-back (403)
    write_back_rules: str = ""
    write_back_rules_file: str = ""
    #: the gate the ``invariance.passed`` tag follows (the client's ``require`` does not): verdict labels
    #: that pass, and whether a borderline verdict fails
    write_back_require: str = "genuine,learned"
    write_back_require_confident: int = 0

    @property
    def resolved_executor(self) -> str:
        if self.executor == "auto":
            return "celery" if self.broker_url else "local"
        return self.executor

    @property
    def queues(self) -> list[str]:
        return [q.strip() for q in (self.worker_queues or "cpu,gpu").split(",") if q.strip()]

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{Path(self.data_dir).resolve() / 'jobs.sqlite3'}"

    @property
    def sandbox_file_mb(self) -> int:
        """RLIMIT_FSIZE of a sandboxed child: half the work-dir cap, so one file cannot fill all of it."""
        return max(1, self.job_scratch_mb // 2)

    @property
    def sandbox_protected_paths(self) -> list[str]:
        """Paths no file rule of a sandboxed child may contain: the data dir, the SQLite file, tokens."""
        paths = [str(Path(self.data_dir).resolve())]
        url = self.resolved_database_url
        if url.startswith("sqlite:///"):
            paths.append(str(Path(url[len("sqlite:///"):]).resolve().parent))
        if self.tokens_file:
            paths.append(str(Path(self.tokens_file).resolve()))
        return paths

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "extra":
                continue
            raw = environ.get(f"AUDIT_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = _coerce(f, raw)
        for key, value in overrides.items():
            if value is not None:
                values[key] = _coerce(_field(cls, key), value) if isinstance(value, str) else value
        settings = cls(**values)
        return dataclasses.replace(settings, data_dir=Path(settings.data_dir))

    def as_env(self) -> dict[str, str]:
        """The ``AUDIT_*`` variables that reproduce these settings in a child process."""
        return {f"AUDIT_{f.name.upper()}": str(getattr(self, f.name)) for f in fields(self) if f.name != "extra"}


def _field(cls: type, name: str) -> dataclasses.Field:
    for f in fields(cls):
        if f.name == name:
            return f
    raise TypeError(f"Expected a setting name, but got {name!r}")


def _coerce(f: dataclasses.Field, raw: Any) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw)
        return str(raw)
    except ValueError:
        raise ValueError(f"Expected AUDIT_{f.name.upper()} to be {kind}, but got {raw!r}") from None


def read_operator_file(path: str | Path, env_name: str, error_cls: type[Exception]) -> str:
    """The text of a file the operator names in ``env_name`` (tokens, write-back rules); an unreadable one is
    the caller's configuration error (``error_cls``) saying which setting, which file and why."""
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise error_cls(f"Expected a readable {env_name}, but {path}: {exc.strerror or exc}") from None
