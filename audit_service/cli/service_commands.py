"""Sub-commands ``serve``, ``worker`` and ``submit`` of ``audit-service``.

* ``serve``  — gunicorn (web workers) + local audit worker processes, supervised together: a
  SIGTERM/SIGINT stops both (a running audit is put back in the queue), one dying stops the other.
* ``worker`` — the audit workers alone (another machine, or a second pool on the same database).
* ``submit`` — send a model to a running service, follow progress, apply ``--require``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .audit_commands import add_spec_arguments, build_spec_dict  # the same spec flags as `audit`

EXIT_OK, EXIT_GATE_FAILED, EXIT_BAD_INPUT = 0, 1, 2
#: ``serve`` refuses to start on a damaged job database (see ``JobStore.open_checked``)
EXIT_DAMAGED_STORE = 3


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start the HTTP service (gunicorn) and local audit workers",
                       description="Start gunicorn and the local audit worker processes (configure with AUDIT_* "
                                   "variables; flags override them).")
    p.add_argument("--host", default=None, help="bind address (AUDIT_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (AUDIT_PORT, default 8000)")
    p.add_argument("--workers", type=int, default=None, help="audit worker processes (AUDIT_WORKERS, default 1)")
    p.add_argument("--web-workers", type=int, default=None, help="gunicorn workers (AUDIT_WEB_WORKERS, default 2)")
    p.add_argument("--data-dir", default=None, help="data directory (AUDIT_DATA_DIR, default ./.audit-data)")
    p.set_defaults(func=cmd_serve)

    w = sub.add_parser("worker", help="run audit worker processes only",
                       description="Run audit workers that take queued jobs from the job store.")
    w.add_argument("--processes", "--workers", dest="processes", type=int, default=None,
                   help="worker processes (AUDIT_WORKERS, default 1)")
    w.add_argument("--data-dir", default=None, help="data directory (AUDIT_DATA_DIR)")
    w.add_argument("--queues", default=None,
                   help="queues to take, comma-separated: cpu, gpu (AUDIT_WORKER_QUEUES, default both)")
    w.set_defaults(func=cmd_worker)

    s = sub.add_parser("submit", help="audit a model on a running service",
                       description="Submit MODEL to a running audit service, follow its progress and apply "
                                   "--require / --strict. Exit 0 passed, 1 gate failed, 2 bad input or failed audit.")
    s.add_argument("model", type=Path, help="ONNX or TorchScript file")
    add_spec_arguments(s)  # the same spec flags as `audit`
    s.add_argument("--url", default=os.environ.get("AUDIT_URL", "http://127.0.0.1:8000"),
                   help="service URL (AUDIT_URL, default http://127.0.0.1:8000)")
    s.add_argument("--token", default=os.environ.get("AUDIT_TOKEN"), help="bearer token (AUDIT_TOKEN)")
    s.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    s.add_argument("--report", type=Path, dest="report_out", help="write the report JSON here")
    s.add_argument("--html", type=Path, dest="html_out", help="write the HTML report here")
    s.add_argument("--quiet", action="store_true", help="no progress lines")
    s.set_defaults(func=cmd_submit)


# ----------------------------------------------------------------------------- serve / worker
def _settings(args: argparse.Namespace, **extra: object):
    from ..jobs.settings import Settings

    return Settings.from_env(data_dir=getattr(args, "data_dir", None), **extra)


def cmd_worker(args: argparse.Namespace) -> int:
    from ..jobs.worker import run_workers

    settings = _settings(args, workers=args.processes, worker_queues=args.queues)
    private_data_dir(settings.data_dir)
    if settings.resolved_executor == "celery":
        return run_celery_worker(settings)
    return run_workers(settings, processes=settings.workers)


def run_celery_worker(settings) -> int:  # noqa: ANN001
    """``celery worker`` for this machine's queues: prefork, ``--concurrency`` = AUDIT_WORKERS, one task
    per process at a time (prefetch 1, acks late: see ``jobs.celery_app``)."""
    from ..jobs.store import JobStore
    from ..jobs.launcher import PACKAGE_ROOT

    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    JobStore(settings.resolved_database_url).init_schema()
    env = {**os.environ, **settings.as_env(), "AUDIT_DATA_DIR": str(Path(settings.data_dir).resolve())}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))
    import uuid

    cmd = [sys.executable, "-m", "celery", "-A", "audit_service.jobs.celery_app", "worker",
           "--queues", ",".join(settings.queues), "--concurrency", str(max(1, settings.workers)),
           "--pool", "prefork", "--prefetch-multiplier", "1", "-O", "fair", "--without-gossip",
           "--without-mingle", "--loglevel", "INFO", "--hostname", f"audit-{uuid.uuid4().hex[:8]}@%h"]
    proc = subprocess.Popen(cmd, env=env)

    def _forward(signum: int, _frame: object) -> None:
        proc.send_signal(signum)

    signal.signal(signal.SIGTERM, _forward)
    signal.signal(signal.SIGINT, _forward)
    return proc.wait()


def cmd_serve(args: argparse.Namespace) -> int:
    from ..jobs.store import JobStore

    settings = _settings(args, host=args.host, port=args.port, workers=args.workers, web_workers=args.web_workers)
    from ..service.auth import check_bind

    refusal = check_bind(settings.host, settings)
    if refusal:
        print(f"audit-service: error: {refusal}", file=sys.stderr)
        return EXIT_BAD_INPUT
    private_data_dir(settings.data_dir)
    raise_open_files(settings.web_workers * settings.web_connections)
    damage = JobStore(settings.resolved_database_url).open_checked()  # integrity, lost commits; then the schema
    if damage:
        print(f"audit-service: error: refusing to start: {damage}", file=sys.stderr)
        return EXIT_DAMAGED_STORE
    from ..jobs.launcher import PACKAGE_ROOT

    env = {**os.environ, **settings.as_env(), "AUDIT_DATA_DIR": str(Path(settings.data_dir).resolve())}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))
    gunicorn = [sys.executable, "-m", "gunicorn", *gunicorn_options(settings), "audit_service.service.wsgi:app"]
    workers = [sys.executable, "-m", "audit_service.cli", "worker", "--processes", str(settings.workers)]
    children: list[subprocess.Popen] = []
    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"audit-service: serving on http://{settings.host}:{settings.port} with {settings.web_workers} web "
          f"workers and {settings.workers} audit workers (data: {Path(settings.data_dir).resolve()})",
          file=sys.stderr, flush=True)
    def start(cmd: list[str]) -> subprocess.Popen:
        return subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)

    if settings.workers > 0:  # 0: web only (another machine runs `audit-service worker`)
        children.append(start(workers))
    children.append(start(gunicorn))
    rc = 0
    restarts: list[float] = []
    try:
        while not stopping:
            dead = [c for c in children if c.poll() is not None]
            if dead and dead[0].args is workers and len([t for t in restarts if t > time.monotonic() - 60]) < 5:
                # a worker pool killed under us (OOM killer, kill -9): start a new one; it takes back the
                # jobs the dead one held (their owner is dead) and runs them again
                print(f"audit-service: audit workers exited with {dead[0].returncode}; restarting them",
                      file=sys.stderr, flush=True)
                restarts.append(time.monotonic())
                children[children.index(dead[0])] = start(workers)
                continue
            if dead:
                rc = dead[0].returncode or 1
                print(f"audit-service: {dead[0].args[2]} exited with {dead[0].returncode}; stopping",
                      file=sys.stderr, flush=True)
                break
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for child in children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    return 0 if stopping else rc


#: gunicorn's own request limits (its defaults, stated): longer lines answer 414, more or larger headers 431
LIMIT_REQUEST_LINE, LIMIT_REQUEST_FIELDS, LIMIT_REQUEST_FIELD_SIZE = 4094, 100, 8190


def gunicorn_options(settings) -> list[str]:  # noqa: ANN001
    """The gunicorn command line of ``serve``: gevent workers (``service.gworker``: a greenlet per
    connection, header and idle timeouts, problem+json refusals), a logger that redacts tokens in URLs,
    and no control socket (gunicorn's default is one per user, shared by every instance)."""
    return ["--bind", f"{settings.host}:{settings.port}", "--workers", str(settings.web_workers),
            "--worker-class", "audit_service.service.gworker.AuditWorker",
            "--worker-connections", str(settings.web_connections),
            # a worker whose event loop is blocked this long (it cannot send its heartbeat) is replaced;
            # also the budget for loading the app and warming the sandbox fork server
            "--timeout", "120", "--graceful-timeout", "10",
            "--keep-alive", str(max(1, math.ceil(settings.header_timeout_s))),
            "--limit-request-line", str(LIMIT_REQUEST_LINE), "--limit-request-fields", str(LIMIT_REQUEST_FIELDS),
            "--limit-request-field_size", str(LIMIT_REQUEST_FIELD_SIZE),
            "--logger-class", "audit_service.service.edge.RedactingLogger", "--no-control-socket",
            "--access-logfile", "-", "--error-logfile", "-"]


def raise_open_files(connections: int) -> None:
    """Lift the soft open-file limit (inherited by gunicorn) toward the hard one: each connection is a descriptor,
    and a pool that cannot accept answers nobody, ``/healthz`` included."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + 1024
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def private_data_dir(data_dir: Path) -> None:
    """Files this process and its children create are the service user's alone (umask 077: files
    0600, folders 0700), and so is the data dir, whatever its mode was."""
    os.umask(0o077)
    path = Path(data_dir)
    path.mkdir(parents=True, exist_ok=True)
    try:
        path.chmod(0o700)
    except PermissionError:  # another user's (shared) dir: leave it to its owner
        print(f"audit-service: warning: cannot make {path} private (chmod 700): not its owner", file=sys.stderr)


def _die_with_parent() -> None:  # pragma: no cover - child
    """PR_SET_PDEATHSIG: gunicorn and the workers go when ``serve`` is killed (even with -9)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------- submit
def cmd_submit(args: argparse.Namespace) -> int:
    from ..adapters.client import AuditClient, JobFailed, ServiceError, gate
    from ..engine.errors import AuditError

    try:
        spec = build_spec_dict(args)
    except AuditError as exc:
        print(f"audit-service: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for name in ("model", "probes", "labels", "second_probes"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            print(f"audit-service: error: {name}: Expected a readable file, but {path} does not exist", file=sys.stderr)
            return EXIT_BAD_INPUT
    client = AuditClient(args.url, token=args.token)

    def show(job: dict) -> None:
        if not args.quiet:
            print(f"  {job['status']:<9} {float(job.get('progress') or 0):>4.0%}  {job.get('stage', '')}",
                  file=sys.stderr, flush=True)

    try:
        job = client.submit(args.model, spec, probes=args.probes, labels=args.labels,
                            second_probes=args.second_probes)
        if not args.quiet:
            print(f"audit-service: submitted {job['id']} to {args.url}", file=sys.stderr, flush=True)
        job = client.wait(job["id"], progress=show, timeout=args.timeout)
        if job["status"] != "succeeded":
            raise JobFailed(job)
        report = client.report(job["id"])
        if args.report_out:
            args.report_out.write_text(json.dumps(report, indent=2))
        if args.html_out:
            args.html_out.write_text(client.report_html(job["id"]))
    except ServiceError as exc:
        print(f"audit-service: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except JobFailed as exc:
        print(f"audit-service: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TimeoutError as exc:
        print(f"audit-service: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # the gate the service applied (the spec's require, --strict), read from the plain dict: a stored report the
    # engine's models would refuse still gives a verdict and an exit status rather than a traceback
    passed, label = gate(report)
    verdict = report.get("verdict") if isinstance(report.get("verdict"), dict) else {}
    print(json.dumps({"id": job["id"], "verdict": label, "passed": passed, "require": verdict.get("require"),
                      "reasons": verdict.get("reasons") or [],
                      "report": f"{args.url.rstrip('/')}/audits/{job['id']}/report.html"}))
    # like `audit`: the exit status is the gate the answer prints (the spec's, default genuine,learned)
    return EXIT_GATE_FAILED if not passed else EXIT_OK
