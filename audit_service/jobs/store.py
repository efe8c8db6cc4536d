"""The job store: job rows and reports in one SQL database (SQLite file by default, WAL mode).

Every status change (claim, succeed, fail, release, cancel, recovery) goes through ``JobStore.transition``
— a single ``UPDATE ... WHERE id = :id AND status IN (:allowed)`` that checks ``states.check_transition``
and writes the status with the fields that go with it — so two workers can never both claim a job, and a
worker that lost its lease (the job was cancelled or taken back) finds out on its next heartbeat. Every
reader returns frozen values: ``Job`` (``get``, ``claim``, ``create``, ``list``...), ``JobSummary`` for a job
list (``summaries``), ``JobError`` for why a job failed, the typed ``Report`` for a stored audit's report. Specs
and inputs are stored as JSON, never pickled. Every job carries a ``tenant`` (``"default"`` until authentication exists).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from sqlalchemy import (Boolean, Column, Float, ForeignKey, Integer, MetaData, String, Table, Text, create_engine,
                        delete, event, func, insert, select, update)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError, OperationalError

from ..engine.schema import Report
from .states import READY_STATES, JobKind, JobStatus, check_transition
from .summaries import spec_summary, with_group_order

DEFAULT_TENANT = "default"

metadata = MetaData()

jobs = Table(
    "jobs", metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant", String(128), nullable=False, default=DEFAULT_TENANT, index=True),
    Column("kind", String(32), nullable=False, default=JobKind.AUDIT.value),
    Column("status", String(16), nullable=False, index=True),
    #: which pool of workers may take the job (``cpu`` / ``gpu``); the Celery mode routes on it
    Column("queue", String(32), nullable=False, default="default"),
    Column("created_at", Float, nullable=False, index=True),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("updated_at", Float, nullable=False),
    Column("progress", Float, nullable=False, default=0.0),
    Column("stage", String(128), nullable=False, default="queued"),
    Column("spec_json", Text, nullable=False),
    Column("inputs_json", Text, nullable=False),
    Column("error_json", Text),
    Column("verdict", String(32)),
    #: the report's own gate (its require, and require_confident with a borderline verdict): the job view says it
    Column("passed", Boolean),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False, default=2),
    Column("timeout_s", Float, nullable=False),
    Column("owner", String(255)),
    Column("lease_expires_at", Float),
    Column("sandbox_pid", Integer),
    #: sha256 over tenant, model, canonical spec and probe hashes (``dedupe_key``): finds a finished twin
    Column("dedupe_key", String(64), index=True),
    #: when the job was last handed to the broker (Celery mode); None = not yet (re-sent by the reaper)
    Column("dispatched_at", Float),
    #: what a job list shows of the spec (``summaries.spec_summary``, JSON): lists never read ``spec_json``
    Column("spec_summary", Text),
    #: the MLflow write-back's outcome (``jobs.write_back``), JSON; None: none was asked for (or not yet done)
    Column("write_back_json", Text),
)

#: columns added after the first release: ``init_schema`` adds them to an existing table
_ADDED_COLUMNS = {"dedupe_key": "VARCHAR(64)", "dispatched_at": "FLOAT", "passed": "BOOLEAN", "spec_summary": "TEXT",
                  "write_back_json": "TEXT"}

#: PostgreSQL advisory lock keys: schema creation, and check-then-insert submissions (``_write_tx``)
_SCHEMA_LOCK_KEY = 727273
_SUBMIT_LOCK_KEY = 727274

reports = Table(
    "reports", metadata,
    Column("job_id", String(32), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("report_json", Text, nullable=False),
)


MiB = 1024 * 1024


#: a counter outside the jobs table: ``jobs_created`` counts every job ever inserted (never decremented)
meta = Table(
    "meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Integer, nullable=False),
)

#: the sidecar next to a SQLite file: the highest ``jobs_created`` known committed (``JobStore.open_checked``)
SIDECAR_SUFFIX = ".committed"
SQLITE_MAGIC = b"SQLite format 3\0"


class QueueFull(Exception):
    def __init__(self, depth: int, limit: int) -> None:
        super().__init__(f"{depth} jobs are queued (limit {limit})")
        self.depth, self.limit = depth, limit


class TenantLimit(QueueFull):
    """The tenant already has ``limit`` jobs queued or running."""

    def __init__(self, depth: int, limit: int, tenant: str) -> None:
        super().__init__(depth, limit)
        self.tenant = tenant


class TenantStoredLimit(TenantLimit):
    """The tenant already keeps ``limit`` jobs (finished ones and duplicates included): it must delete some."""


@dataclass(frozen=True)
class JobError:
    """Why a job failed: ``type`` is a short code (``crashed``, ``timeout``, ``out_of_memory``, an
    ``AuditError`` class name...), ``message`` says what happened and what to do."""

    type: str
    message: str
    field: str | None = None

    def to_dict(self) -> dict:
        """The stored ``error_json`` (and the job JSON's ``error``)."""
        return {"type": self.type, "message": self.message, "field": self.field}

    @classmethod
    def from_json(cls, text: str | None) -> "JobError | None":
        """The stored ``error_json`` column; None when the job did not fail."""
        if not text:
            return None
        data = json.loads(text)
        return cls(str(data["type"]), str(data["message"]), data.get("field"))


@dataclass(frozen=True, kw_only=True)
class JobSummary:
    """A job as a list shows it (``JobStore.summaries``): whose (``tenant``), where it stands (``status``,
    ``progress``, ``stage``, ``attempts``), how it ended (``verdict``, ``passed``, ``error``) and when (unix
    timestamps), with ``spec_summary`` (``summaries.spec_summary``) in place of the spec and inputs, which a
    list never reads."""

    id: str
    tenant: str
    kind: str
    status: JobStatus
    queue: str
    created_at: float
    updated_at: float
    progress: float = 0.0
    stage: str = "queued"
    attempts: int = 0
    max_attempts: int = 0
    timeout_s: float = 0.0
    verdict: str | None = None
    passed: bool | None = None
    error: JobError | None = None
    started_at: float | None = None
    finished_at: float | None = None
    owner: str | None = None
    lease_expires_at: float | None = None
    sandbox_pid: int | None = None
    dedupe_key: str | None = None
    dispatched_at: float | None = None
    #: None only for a row stored before summaries existed (``summaries`` makes one from its spec)
    spec_summary: dict | None = None

    @property
    def ready(self) -> bool:
        return self.status in READY_STATES

    @property
    def group_order(self) -> int | None:
        """The group's order as the summary states it (a finished audit's: as built)."""
        group = (self.spec_summary or {}).get("group")
        order = group.get("order") if isinstance(group, dict) else None
        return order if isinstance(order, int) else None


@dataclass(frozen=True, kw_only=True)
class Job(JobSummary):
    """One job as stored: a ``JobSummary`` with what it is (``spec``, ``inputs``) and, once the worker tried,
    the MLflow write-back's outcome."""

    spec: dict
    inputs: dict
    #: the MLflow write-back's outcome ({status, uri, version, attempts, tags | error}), once the worker tried
    write_back: dict | None = None


#: JSON columns and the fields they are read into
_JSON_COLUMNS = {"spec_json": "spec", "inputs_json": "inputs", "write_back_json": "write_back",
                 "spec_summary": "spec_summary"}


def _fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """A ``jobs`` row's columns as ``Job`` fields: the JSON columns parsed, the status an enum."""
    values = dict(row)
    for column, name in _JSON_COLUMNS.items():
        if column in values:
            text = values.pop(column)
            values[name] = json.loads(text) if text else None
    values["error"] = JobError.from_json(values.pop("error_json", None))
    values["status"] = JobStatus(values["status"])
    return values


def _job(row: Mapping[str, Any]) -> Job:
    return Job(**_fields(row))


#: what the -wal file is truncated to after a checkpoint (SQLite keeps it at its largest otherwise)
WAL_LIMIT_BYTES = 16 * 1024 * 1024

_ENGINES: dict[tuple[str, int], Engine] = {}
_ENGINES_LOCK = threading.Lock()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (``_sqlite_begin``)
    cur = dbapi_conn.cursor()
    # a new database frees the pages of deleted jobs back to the file system (``JobStore.reclaim``); an older
    # one is converted once at startup (``JobStore.open_checked``)
    cur.execute("PRAGMA auto_vacuum=INCREMENTAL")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")  # the -wal file shrinks back after a burst
    # FULL: the WAL is fsynced at every commit, so a job answered 202 survives a power cut (NORMAL would
    # keep the file consistent but may lose the last commits); docs/deployment.md states this promise
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    """``BEGIN IMMEDIATE`` for check-then-insert writes (``immediate=True``): the write lock is taken
    before the count is read, so two submissions can never both pass a limit."""
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("immediate") else "BEGIN")


def get_engine(url: str) -> Engine:
    """One engine per (URL, process): engines must not cross ``fork``."""
    key = (url, os.getpid())
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            if url.startswith("sqlite"):
                engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                                       pool_size=16, max_overflow=16)
                event.listen(engine, "connect", _sqlite_pragmas)
                event.listen(engine, "begin", _sqlite_begin)
            else:
                engine = create_engine(url, pool_pre_ping=True)
            _ENGINES[key] = engine
        return engine


def new_job_id() -> str:
    return uuid.uuid4().hex


def owner_id() -> str:
    """``host:pid:random`` — who holds a job's lease."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class JobStore:
    def __init__(self, url: str, max_report_bytes: int | None = None) -> None:
        self.url = url
        if max_report_bytes is None:
            max_report_bytes = int(os.environ.get("AUDIT_MAX_REPORT_MB") or 8) * MiB
        #: hard cap on one stored report (``bounded_report_json``)
        self.max_report_bytes = max_report_bytes
        if url.startswith("sqlite:///"):
            from pathlib import Path

            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)

    @property
    def engine(self) -> Engine:
        return get_engine(self.url)

    def init_schema(self) -> None:
        """Create the tables and add columns introduced later; safe when many processes start at once."""
        if self.engine.dialect.name == "postgresql":
            self._init_schema_locked()
            return
        for attempt in range(5):  # several processes may start at once
            try:
                metadata.create_all(self.engine)
                self._add_missing_columns()
                self._init_counter(self.engine)
                return
            except OperationalError:
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def _init_schema_locked(self) -> None:
        """PostgreSQL: concurrent ``CREATE TABLE``s do not wait for each other, they fail (unique violation
        in ``pg_type``, "relation already exists"; a duplicate ``ADD COLUMN`` is a ProgrammingError, not an
        OperationalError). One transaction-scoped advisory lock makes them take turns; DDL is transactional
        there, so whoever comes next sees the tables and columns and does nothing."""
        from sqlalchemy import inspect, text

        with self.engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
            metadata.create_all(conn)
            present = {c["name"] for c in inspect(conn).get_columns("jobs")}
            for name, sql_type in _ADDED_COLUMNS.items():
                if name not in present:
                    conn.execute(text(f"ALTER TABLE jobs ADD COLUMN {name} {sql_type}"))
        self._init_counter(self.engine)

    @staticmethod
    def _init_counter(engine: Engine) -> None:
        """The ``jobs_created`` row; an existing database starts it at its number of jobs."""
        from sqlalchemy.exc import IntegrityError

        with engine.connect() as conn:
            if conn.execute(select(meta.c.value).where(meta.c.key == "jobs_created")).first() is not None:
                return
        try:
            with engine.begin() as conn:
                n = conn.execute(select(func.count()).select_from(jobs)).scalar_one()
                conn.execute(insert(meta).values(key="jobs_created", value=int(n)))
        except (IntegrityError, OperationalError):  # another process made it first
            pass

    # ------------------------------------------------------------------ damage and lost commits (SQLite)
    @property
    def sqlite_path(self) -> Path | None:
        from pathlib import Path

        return Path(self.url[len("sqlite:///"):]) if self.url.startswith("sqlite:///") else None

    def open_checked(self) -> str | None:
        """Check the database before the service starts; None when it is sound, else what happened and
        what to do (``serve`` prints it and exits). SQLite: the file is a SQLite database,
        ``PRAGMA quick_check`` passes, and no committed job is missing: the count of jobs ever created
        is kept in the database (``meta``) and, after each commit, in a sidecar file beside it
        (``<db>.committed``); a database that counts fewer than its sidecar lost commits (a truncated or
        deleted ``-wal``, a restored older copy). Loss from the last checkpoint's main file itself, or of the
        database and the sidecar together, is not detectable this way. Then creates the schema."""
        path = self.sqlite_path
        try:
            if path is not None:
                problem = self._check_sqlite(path)
                if problem:
                    return problem
            self.init_schema()
            if path is not None:
                self._convert_to_incremental_vacuum()
                return self._check_sidecar(path)
        except Exception as exc:  # noqa: BLE001 - a message, never a traceback
            where = f"the job database {path}" if path is not None else "the job database"
            return (f"{where} could not be opened ({type(exc).__name__}: {str(getattr(exc, 'orig', exc))[:300]}); "
                    f"if the file is damaged, restore it from a backup or move it aside (with its -wal, -shm and "
                    f"{SIDECAR_SUFFIX} files) to start with an empty one")
        return None

    def _check_sqlite(self, path: "Path") -> str | None:
        aside = (f"restore {path.name} from a backup, or move {path.name}, {path.name}-wal, {path.name}-shm and "
                 f"{path.name}{SIDECAR_SUFFIX} aside to start with an empty database (the jobs in it are then gone)")
        if not path.exists():
            if self._sidecar(path).exists():
                return (f"the job database {path} is missing, but {path.name}{SIDECAR_SUFFIX} says "
                        f"{self._sidecar_count(path)} jobs were committed to it: it was deleted or the data dir is "
                        f"not the one the service used; {aside}")
            return None
        if path.stat().st_size > 0:
            with open(path, "rb") as fh:
                head = fh.read(len(SQLITE_MAGIC))
            if head != SQLITE_MAGIC:
                return f"the job database {path} is not a SQLite database (its first bytes are {head[:16]!r}); {aside}"
        import sqlite3

        try:
            conn = sqlite3.connect(str(path), timeout=30)
            try:
                rows = [r[0] for r in conn.execute("PRAGMA quick_check(5)").fetchall()]
            finally:
                conn.close()
        except sqlite3.DatabaseError as exc:
            return f"the job database {path} is damaged ({exc}); {aside}"
        if rows != ["ok"]:
            return f"the job database {path} failed its integrity check ({'; '.join(map(str, rows))[:400]}); {aside}"
        return None

    def _check_sidecar(self, path: "Path") -> str | None:
        recorded = self._sidecar_count(path)
        if recorded is None:
            return None
        with self.engine.connect() as conn:
            have = conn.execute(select(meta.c.value).where(meta.c.key == "jobs_created")).scalar() or 0
        if have < recorded:
            return (f"the job database {path} lost committed jobs: it counts {have} jobs ever created, but "
                    f"{path.name}{SIDECAR_SUFFIX} recorded {recorded} after they were committed (a truncated or "
                    f"deleted {path.name}-wal after a crash, or an older copy of the file); restore it from a backup, "
                    f"or to accept the loss and start with what is left, move {path.name}{SIDECAR_SUFFIX} aside")
        return None

    def _convert_to_incremental_vacuum(self) -> None:
        """A SQLite file made before deletes freed space (``auto_vacuum`` none) is rebuilt once with
        ``auto_vacuum=INCREMENTAL`` (a ``VACUUM``: it needs the file's size free again, and takes seconds
        per GiB); one that cannot be (disk full, busy) stays as it is and is tried at the next start."""
        import sqlite3

        raw = self.engine.raw_connection()  # outside SQLAlchemy's BEGIN: VACUUM runs in no transaction
        try:
            cur = raw.cursor()
            if cur.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
                return
            try:
                cur.execute("PRAGMA auto_vacuum=INCREMENTAL")
                cur.execute("VACUUM")
            except sqlite3.OperationalError:
                pass
        finally:
            raw.close()

    def reclaim(self) -> None:
        """Give the pages deleted jobs freed back to the file system (SQLite with incremental auto-vacuum):
        the file shrinks after a delete instead of staying at its largest."""
        import sqlite3

        if self.sqlite_path is None:
            return
        raw = self.engine.raw_connection()  # autocommit: each pragma commits on its own
        try:
            cur = raw.cursor()
            cur.executescript("PRAGMA incremental_vacuum;")  # stepped to the end (execute frees one page)
            cur.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()  # never waits for readers
        except sqlite3.OperationalError:  # busy: the pages stay free inside the file and are reused, or go next time
            pass
        except Exception:  # noqa: BLE001 - housekeeping after a committed delete: never a failed request
            logging.getLogger("audit_service.jobs").warning("reclaiming freed pages failed", exc_info=True)
        finally:
            raw.close()

    @staticmethod
    def _sidecar(path: "Path") -> "Path":
        return path.with_name(path.name + SIDECAR_SUFFIX)

    def _sidecar_count(self, path: "Path") -> int | None:
        try:
            return int(self._sidecar(path).read_text().strip() or 0)
        except (OSError, ValueError):
            return None

    def _record_committed(self, count: int) -> None:
        """After a commit: raise the sidecar's count to ``count`` (never lower it; one writer at a time)."""
        path = self.sqlite_path
        if path is None:
            return
        import fcntl

        try:
            fd = os.open(self._sidecar(path), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return  # e.g. disk full: the marker lags, which only weakens detection
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            current = os.read(fd, 64).strip()
            if not current.isdigit() or int(current) < count:
                data = str(count).encode()
                os.lseek(fd, 0, os.SEEK_SET)
                os.ftruncate(fd, 0)
                os.write(fd, data)
        except OSError:
            pass
        finally:
            os.close(fd)

    @staticmethod
    def _count_created(conn: Any) -> int:
        conn.execute(update(meta).where(meta.c.key == "jobs_created").values(value=meta.c.value + 1))
        return int(conn.execute(select(meta.c.value).where(meta.c.key == "jobs_created")).scalar() or 0)

    def _add_missing_columns(self) -> None:
        from sqlalchemy import inspect, text

        present = {c["name"] for c in inspect(self.engine).get_columns("jobs")}
        for name, sql_type in _ADDED_COLUMNS.items():
            if name not in present:
                try:
                    with self.engine.begin() as conn:
                        conn.execute(text(f"ALTER TABLE jobs ADD COLUMN {name} {sql_type}"))
                except OperationalError:  # another process added it first
                    pass

    def _write_tx(self):  # noqa: ANN202
        """A transaction that serialises check-then-insert writes (SQLite: BEGIN IMMEDIATE;
        PostgreSQL: a transaction-scoped advisory lock)."""
        if self.url.startswith("sqlite"):
            return self.engine.execution_options(immediate=True).begin()
        from contextlib import contextmanager
        from sqlalchemy import text

        @contextmanager
        def tx():  # noqa: ANN202
            with self.engine.begin() as conn:
                if self.engine.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SUBMIT_LOCK_KEY})
                yield conn

        return tx()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(select(func.count()).select_from(jobs).where(jobs.c.status == "queued"))

    # ------------------------------------------------------------------ create / read
    def create(self, *, kind: JobKind, spec: dict, inputs: dict, timeout_s: float, max_attempts: int,
               tenant: str = DEFAULT_TENANT, queue: str = "cpu", max_queued: int | None = None,
               max_tenant_jobs: int | None = None, dedupe_key: str | None = None,
               max_tenant_stored: int | None = None) -> Job:
        """Insert a queued job. Raises ``QueueFull`` past ``max_queued`` queued jobs in all,
        ``TenantLimit`` past ``max_tenant_jobs`` queued + running jobs of ``tenant`` and
        ``TenantStoredLimit`` past ``max_tenant_stored`` jobs it keeps (checked and inserted in one
        serialised transaction)."""
        now = time.time()
        job_id = new_job_id()
        with self._write_tx() as conn:
            self._check_stored(conn, tenant, max_tenant_stored)
            if max_tenant_jobs is not None:
                mine = conn.execute(select(func.count()).select_from(jobs).where(
                    jobs.c.tenant == tenant,
                    jobs.c.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]))).scalar_one()
                if mine >= max_tenant_jobs:
                    raise TenantLimit(mine, max_tenant_jobs, tenant)
            if max_queued is not None:
                depth = conn.execute(select(func.count()).select_from(jobs)
                                     .where(jobs.c.status == JobStatus.QUEUED.value)).scalar_one()
                if depth >= max_queued:
                    raise QueueFull(depth, max_queued)
            conn.execute(insert(jobs).values(
                id=job_id, tenant=tenant, kind=str(kind), status=JobStatus.QUEUED.value, queue=queue,
                created_at=now, updated_at=now, progress=0.0, stage="queued",
                spec_json=json.dumps(spec), inputs_json=json.dumps(inputs),
                attempts=0, max_attempts=max_attempts, timeout_s=float(timeout_s), dedupe_key=dedupe_key,
                spec_summary=json.dumps(spec_summary(spec, inputs)),
            ))
            created = self._count_created(conn)
        self._record_committed(created)
        job = self.get(job_id)
        assert job is not None
        return job

    def create_reused(self, *, source: Job, spec: dict, inputs: dict, timeout_s: float, tenant: str, queue: str,
                      dedupe_key: str, max_tenant_stored: int | None = None) -> Job:
        """A job born ``succeeded`` with ``source``'s report (a duplicate submission). The report is stored once:
        the duplicate's row refers to the job that holds it (``report_text`` follows the reference, ``delete``
        hands the text on to a duplicate before its holder goes), so 200 duplicates cost 200 small rows. A
        duplicate is a job the tenant keeps like any other: ``TenantStoredLimit`` past ``max_tenant_stored``."""
        now = time.time()
        job_id = new_job_id()
        with self._write_tx() as conn:
            self._check_stored(conn, tenant, max_tenant_stored)
            conn.execute(insert(jobs).values(
                id=job_id, tenant=tenant, kind=source.kind, status=JobStatus.SUCCEEDED.value, queue=queue,
                created_at=now, started_at=now, finished_at=now, updated_at=now, progress=1.0,
                stage=f"done (report reused from audit {source.id})", verdict=source.verdict, passed=source.passed,
                spec_json=json.dumps(spec), inputs_json=json.dumps(inputs), attempts=0, max_attempts=0,
                timeout_s=float(timeout_s), dedupe_key=dedupe_key,
                spec_summary=json.dumps(with_group_order(spec_summary(spec, inputs), source.group_order))))
            # whether the source is itself a duplicate: its 200-character head tells, as in report_source (a
            # reference is short), so the source's report text is not loaded inside the write transaction
            head = conn.execute(select(func.substr(reports.c.report_json, 1, 201)).where(
                reports.c.job_id == source.id)).scalar()
            holder = (_reused_from(head) if head is not None and len(head) <= 200 else None) or source.id
            conn.execute(insert(reports).values(job_id=job_id, report_json=_reference(holder)))
            created = self._count_created(conn)
        self._record_committed(created)
        job = self.get(job_id)
        assert job is not None
        return job

    def find_finished(self, dedupe_key: str, tenant: str) -> Job | None:
        """The newest succeeded job of ``tenant`` with ``dedupe_key`` whose report is stored."""
        with self.engine.connect() as conn:
            row = conn.execute(select(jobs).where(jobs.c.dedupe_key == dedupe_key, jobs.c.tenant == tenant,
                                                  jobs.c.status == JobStatus.SUCCEEDED.value)
                               .order_by(jobs.c.finished_at.desc()).limit(1)).mappings().first()
        if row is None or self.report_source(row["id"]) is None:
            return None
        return _job(row)

    @staticmethod
    def _check_stored(conn: Any, tenant: str, limit: int | None) -> None:
        if limit is None:
            return
        kept = conn.execute(select(func.count()).select_from(jobs).where(jobs.c.tenant == tenant)).scalar_one()
        if kept >= limit:
            raise TenantStoredLimit(int(kept), limit, tenant)

    def count_stored(self, tenant: str) -> int:
        """Every job ``tenant`` keeps, whatever its status (duplicates included)."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(jobs).where(jobs.c.tenant == tenant))
                       .scalar_one())

    def count_active(self, tenant: str) -> int:
        """Queued + running jobs of ``tenant``."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(jobs).where(
                jobs.c.tenant == tenant,
                jobs.c.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]))).scalar_one())

    def mark_dispatched(self, job_id: str, when: float | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id)
                         .values(dispatched_at=time.time() if when is None else when))

    def undispatched(self, older_than: float, redispatch_after: float, limit: int = 500) -> list[Job]:
        """Queued jobs never handed to the broker (created before ``older_than``), or handed before
        ``redispatch_after`` and still waiting (the broker may have lost the message)."""
        cond = ((jobs.c.dispatched_at.is_(None) & (jobs.c.created_at < older_than))
                | (jobs.c.dispatched_at < redispatch_after))
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs).where(jobs.c.status == JobStatus.QUEUED.value, cond)
                                .order_by(jobs.c.created_at).limit(limit)).mappings().all()
        return [_job(r) for r in rows]

    def references_blob(self, sha256: str) -> bool:
        """Whether any job's inputs refer to the blob ``sha256`` (a scan; used when deleting)."""
        with self.engine.connect() as conn:
            return conn.execute(select(jobs.c.id).where(jobs.c.inputs_json.contains(sha256)).limit(1)).first() \
                is not None

    def get(self, job_id: str, tenant: str | None = None) -> Job | None:
        """The job ``job_id`` (of ``tenant`` when given), or None."""
        query = select(jobs).where(jobs.c.id == job_id)
        if tenant is not None:
            query = query.where(jobs.c.tenant == tenant)
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return _job(row) if row else None

    def list(self, tenant: str | None = None, limit: int = 20, offset: int = 0,
             status: JobStatus | None = None, kind: JobKind | None = None) -> tuple[list[Job], int]:
        cond = []
        if tenant is not None:
            cond.append(jobs.c.tenant == tenant)
        if status is not None:
            cond.append(jobs.c.status == str(status))
        if kind is not None:
            cond.append(jobs.c.kind == str(kind))
        with self.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(jobs).where(*cond)).scalar_one()
            rows = conn.execute(select(jobs).where(*cond)
                                .order_by(jobs.c.created_at.desc(), jobs.c.id.desc())
                                .limit(limit).offset(offset)).mappings().all()
        return [_job(r) for r in rows], int(total)

    def summaries(self, tenant: str | None = None, limit: int = 20, offset: int = 0,
                  status: JobStatus | None = None) -> tuple[list[JobSummary], int]:
        """``list`` for a job list: the spec and inputs are not read, only their summary (rows stored before
        summaries existed are summarised from their spec)."""
        from sqlalchemy import case

        cond = [] if tenant is None else [jobs.c.tenant == tenant]
        if status is not None:
            cond.append(jobs.c.status == str(status))
        light = [c for c in jobs.c if c.name not in ("spec_json", "inputs_json", "write_back_json")]
        old_spec = case((jobs.c.spec_summary.is_(None), jobs.c.spec_json), else_=None).label("old_spec")
        old_inputs = case((jobs.c.spec_summary.is_(None), jobs.c.inputs_json), else_=None).label("old_inputs")
        with self.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(jobs).where(*cond)).scalar_one()
            rows = conn.execute(select(*light, old_spec, old_inputs).where(*cond)
                                .order_by(jobs.c.created_at.desc(), jobs.c.id.desc())
                                .limit(limit).offset(offset)).mappings().all()
        out = []
        for row in rows:
            values = _fields(row)
            old, old_inputs = values.pop("old_spec"), values.pop("old_inputs")
            if values["spec_summary"] is None:
                values["spec_summary"] = spec_summary(json.loads(old or "{}"), json.loads(old_inputs or "{}"))
            out.append(JobSummary(**values))
        return out, int(total)

    def report(self, job_id: str) -> Report | None:
        """A finished audit's stored report, typed (a reference run's card is no ``Report``: ``report_text``)."""
        text = self.report_text(job_id)
        return Report.model_validate_json(text) if text is not None else None

    def report_text(self, job_id: str) -> str | None:
        """The stored report JSON as text (served as is: no parse, no second copy); a duplicate's is its holder's."""
        with self.engine.connect() as conn:
            text = conn.execute(select(reports.c.report_json).where(reports.c.job_id == job_id)).scalar()
            holder = _reused_from(text)
            if holder is not None:
                text = conn.execute(select(reports.c.report_json).where(reports.c.job_id == holder)).scalar()
            return text

    #: characters per slice of a streamed report (``report_slices``)
    REPORT_SLICE = 256 * 1024

    def report_source(self, job_id: str) -> tuple[str, int] | None:
        """(the job that holds ``job_id``'s report text, its size in bytes), or None; nothing of the text is read
        but a duplicate's reference."""
        from sqlalchemy import LargeBinary, cast

        size = (func.length(cast(reports.c.report_json, LargeBinary)) if self.url.startswith("sqlite")
                else func.octet_length(reports.c.report_json))
        head = func.substr(reports.c.report_json, 1, 200)
        with self.engine.connect() as conn:
            row = conn.execute(select(size, head).where(reports.c.job_id == job_id)).first()
            if row is None:
                return None
            holder = _reused_from(row[1]) if row[0] <= 200 else None
            if holder is None:
                return job_id, int(row[0])
            found = conn.execute(select(size).where(reports.c.job_id == holder)).scalar()
        return (holder, int(found)) if found is not None else None

    def report_slices(self, holder: str, size: int | None = None) -> Iterator[bytes]:
        """The report text of ``holder`` in slices of ``size`` characters, each read on its own (a web worker
        holds one slice per download, not the report); ends early if the row is gone."""
        size = size or self.REPORT_SLICE
        start = 1
        while True:
            with self.engine.connect() as conn:
                piece = conn.execute(select(func.substr(reports.c.report_json, start, size))
                                     .where(reports.c.job_id == holder)).scalar()
            if not piece:
                return
            yield piece.encode()
            if len(piece) < size:
                return
            start += size

    # ------------------------------------------------------------------ the one state-change path
    def transition(self, job_id: str, sources: Iterable[JobStatus], target: JobStatus,
                   owner: str | None = None, *, fields: Mapping[str, Any] | None = None, conn: Any = None,
                   **values: Any) -> bool:
        """Move ``job_id`` from one of ``sources`` to ``target`` atomically, writing ``values`` (and
        ``fields``, for column names that clash with the arguments, e.g. a new ``owner``) in the same
        UPDATE; False if it was not in them (or, with ``owner``, not held by that owner). Entering a ready
        state stamps ``finished_at`` and drops the lease. ``conn``: run inside the caller's transaction."""
        values = {**(fields or {}), **values}
        sources = [JobStatus(s) for s in sources]
        for source in sources:
            check_transition(source, target)
        now = time.time()
        values.setdefault("updated_at", now)
        if target in READY_STATES:
            values.setdefault("finished_at", now)
            values.setdefault("owner", None)
            values.setdefault("lease_expires_at", None)
        stmt = (update(jobs).where(jobs.c.id == job_id, jobs.c.status.in_([s.value for s in sources]))
                .values(status=target.value, **values))
        if owner is not None:
            stmt = stmt.where(jobs.c.owner == owner)
        if conn is not None:
            return conn.execute(stmt).rowcount == 1
        with self.engine.begin() as tx:
            return tx.execute(stmt).rowcount == 1

    def claim(self, owner: str, lease_s: float, job_id: str | None = None,
              queues: Iterable[str] | None = None) -> Job | None:
        """Take the next queued job (or ``job_id``) for ``owner``; None when there is none to take.

        Round-robin across tenants: the tenant with the fewest running jobs goes first, then the one whose
        last job started longest ago (never = first), then the oldest job; within the chosen tenant, its
        oldest job. One tenant's burst therefore cannot make another's single job wait behind all of it."""
        for _ in range(20):
            if job_id is None:
                query = self._next_job_query(queues)
                with self.engine.connect() as conn:
                    candidate = conn.execute(query).scalar()
                if candidate is None:
                    return None
            else:
                candidate = job_id
            now = time.time()
            if self._claim_one(candidate, owner, now, lease_s):
                return self.get(candidate)
            if job_id is not None:
                return None
        return None

    @staticmethod
    def _next_job_query(queues: Iterable[str] | None):  # noqa: ANN205
        running = (select(jobs.c.tenant, func.count().label("n")).where(jobs.c.status == JobStatus.RUNNING.value)
                   .group_by(jobs.c.tenant).subquery("running"))
        last = (select(jobs.c.tenant, func.max(jobs.c.started_at).label("at")).where(jobs.c.started_at.is_not(None))
                .group_by(jobs.c.tenant).subquery("last_start"))
        query = (select(jobs.c.id)
                 .select_from(jobs.outerjoin(running, running.c.tenant == jobs.c.tenant)
                              .outerjoin(last, last.c.tenant == jobs.c.tenant))
                 .where(jobs.c.status == JobStatus.QUEUED.value))
        if queues is not None:
            query = query.where(jobs.c.queue.in_(list(queues)))
        return query.order_by(func.coalesce(running.c.n, 0), func.coalesce(last.c.at, 0.0), jobs.c.created_at,
                              jobs.c.id).limit(1)

    def _claim_one(self, job_id: str, owner: str, now: float, lease_s: float) -> bool:
        return self.transition(job_id, [JobStatus.QUEUED], JobStatus.RUNNING, fields={"owner": owner},
                               lease_expires_at=now + lease_s, started_at=now, updated_at=now,
                               attempts=jobs.c.attempts + 1, stage="starting", progress=0.0, sandbox_pid=None)

    def heartbeat(self, job_id: str, owner: str, lease_s: float, progress: float | None = None,
                  stage: str | None = None, sandbox_pid: int | None = None) -> bool:
        """Renew the lease (and record progress). False: the job is no longer ours (cancelled, taken back)."""
        now = time.time()
        values: dict[str, Any] = {"lease_expires_at": now + lease_s, "updated_at": now}
        if progress is not None:
            values["progress"] = max(0.0, min(1.0, float(progress)))
        if stage is not None:
            values["stage"] = str(stage)[:128]
        if sandbox_pid is not None:
            values["sandbox_pid"] = sandbox_pid
        stmt = (update(jobs).where(jobs.c.id == job_id, jobs.c.owner == owner,
                                   jobs.c.status == JobStatus.RUNNING.value).values(**values))
        with self.engine.begin() as conn:
            return conn.execute(stmt).rowcount == 1

    def succeed(self, job_id: str, owner: str, report: Report | dict[str, Any]) -> bool:
        """Store the report and mark the job succeeded, in one transaction: an audit's typed ``Report`` (its
        verdict, gate, group order and write-back outcome are kept on the job too), or a reference run's card
        (a dict: no verdict). A report past ``max_report_bytes`` fails the job (``report_too_large``) instead;
        a database that cannot take the write because it is damaged fails the job with that cause (when the
        job's row can still be written) rather than leaving it to expire as ``worker_lost``."""
        audit = report if isinstance(report, Report) else None
        label = audit.verdict.label if audit is not None else None
        passed = audit.verdict.passed if audit is not None else None
        outcome = audit.mlflow_write_back if audit is not None else None
        try:
            text = bounded_report_json(report, self.max_report_bytes)
        except ReportTooLarge as exc:
            return self.fail(job_id, JobError("report_too_large", str(exc)), owner=owner)
        now = time.time()
        try:
            with self.engine.begin() as conn:
                # both writes in one transaction: a job is never succeeded without its report
                moved = self.transition(job_id, [JobStatus.RUNNING], JobStatus.SUCCEEDED, owner=owner, conn=conn,
                                        progress=1.0, stage="done", verdict=label, passed=passed, finished_at=now,
                                        updated_at=now, write_back_json=json.dumps(outcome.to_json())
                                        if outcome is not None else None)
                if moved:
                    conn.execute(delete(reports).where(reports.c.job_id == job_id))
                    conn.execute(insert(reports).values(job_id=job_id, report_json=text))
                    summary = conn.execute(select(jobs.c.spec_summary).where(jobs.c.id == job_id)).scalar()
                    if summary and audit is not None:  # the group's order as built (a permutation group's closure)
                        conn.execute(update(jobs).where(jobs.c.id == job_id).values(
                            spec_summary=json.dumps(with_group_order(json.loads(summary), audit.group.order))))
        except DatabaseError as exc:
            if not is_damaged(exc):
                raise
            cause = JobError("database_damaged", f"the audit finished, but the job database refused its report "
                             f"({str(exc.orig)[:200]}); the operator must check the database (PRAGMA "
                             f"integrity_check) and restore it from a backup; then submit again")
            try:
                self.fail(job_id, cause, owner=owner)
            except DatabaseError:
                pass
            raise
        return moved

    def fail(self, job_id: str, error: JobError, owner: str | None = None,
             sources: Iterable[JobStatus] = (JobStatus.RUNNING,)) -> bool:
        return self.transition(job_id, sources, JobStatus.FAILED, owner=owner,
                               error_json=json.dumps(error.to_dict()), stage="failed")

    def release(self, job_id: str, owner: str) -> bool:
        """Graceful worker shutdown: put the job back in the queue without counting the attempt."""
        return self.transition(job_id, [JobStatus.RUNNING], JobStatus.QUEUED, owner=owner,
                               fields={"owner": None}, lease_expires_at=None, started_at=None, sandbox_pid=None,
                               stage="queued", progress=0.0, dispatched_at=None,
                               attempts=func.max(jobs.c.attempts - 1, 0) if self.url.startswith("sqlite")
                               else func.greatest(jobs.c.attempts - 1, 0))

    def cancel(self, job_id: str, tenant: str | None = None) -> bool:
        if tenant is not None and self.get(job_id, tenant) is None:
            return False
        return self.transition(job_id, [JobStatus.QUEUED, JobStatus.RUNNING], JobStatus.CANCELLED,
                               stage="cancelled")

    def delete(self, job_id: str, tenant: str | None = None) -> bool:
        """Delete a finished job and its report."""
        cond = [jobs.c.id == job_id, jobs.c.status.in_([s.value for s in READY_STATES])]
        if tenant is not None:
            cond.append(jobs.c.tenant == tenant)
        with self.engine.begin() as conn:
            text = conn.execute(select(reports.c.report_json).where(reports.c.job_id == job_id)).scalar()
            if conn.execute(delete(jobs).where(*cond)).rowcount != 1:
                return False  # not finished, or another tenant's: its report stays too
            conn.execute(delete(reports).where(reports.c.job_id == job_id))
            dependents = conn.execute(select(reports.c.job_id).where(
                reports.c.report_json == _reference(job_id)).order_by(reports.c.job_id)).scalars().all()
            if dependents and text is not None:  # the report lives on in its first duplicate
                heir = dependents[0]
                conn.execute(update(reports).where(reports.c.job_id == heir).values(report_json=text))
                conn.execute(update(reports).where(reports.c.job_id.in_(dependents[1:]))
                             .values(report_json=_reference(heir)))
        self.reclaim()
        return True

    # ------------------------------------------------------------------ recovery
    def recover_lost(self, now: float | None = None, dead_owners: Iterable[str] = ()) -> list[tuple[str, str]]:
        """Running jobs whose lease expired (or whose owner is known dead) go back to the queue if they
        have attempts left, else fail with the reason. Returns [(job_id, "requeued"|"failed")]."""
        now = time.time() if now is None else now
        dead = list(dead_owners)
        cond = jobs.c.lease_expires_at < now
        if dead:
            cond = cond | jobs.c.owner.in_(dead)
        with self.engine.connect() as conn:
            lost = conn.execute(select(jobs.c.id, jobs.c.owner, jobs.c.attempts, jobs.c.max_attempts)
                                .where(jobs.c.status == JobStatus.RUNNING.value, cond)).all()
        outcome = []
        for job_id, owner, attempts, max_attempts in lost:
            if attempts < max_attempts:
                if self.transition(job_id, [JobStatus.RUNNING], JobStatus.QUEUED, owner=owner,
                                   fields={"owner": None}, lease_expires_at=None, sandbox_pid=None,
                                   stage="queued (retry after lost worker)", progress=0.0, updated_at=now,
                                   dispatched_at=None):
                    outcome.append((job_id, "requeued"))
            else:
                err = JobError("worker_lost", f"the worker running this job stopped (owner {owner}) "
                                              f"{attempts} time(s); it was retried and is not tried again")
                if self.transition(job_id, [JobStatus.RUNNING], JobStatus.FAILED, owner=owner,
                                   error_json=json.dumps(err.to_dict()), stage="failed"):
                    outcome.append((job_id, "failed"))
        return outcome

    def running_owners(self) -> list[str]:
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(select(jobs.c.owner).distinct()
                                               .where(jobs.c.status == JobStatus.RUNNING.value)).all() if r[0]]

    # ------------------------------------------------------------------ numbers for /metrics and 429
    def counts_by_status(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status)).all()
        counts = {s.value: 0 for s in JobStatus}
        counts.update({status: int(n) for status, n in rows})
        return counts

    def durations(self, limit: int = 10_000) -> list[float]:
        """Run times (s) of the most recent finished audits."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(jobs.c.finished_at - jobs.c.started_at)
                                .where(jobs.c.status.in_([JobStatus.SUCCEEDED.value, JobStatus.FAILED.value]),
                                       jobs.c.started_at.is_not(None), jobs.c.finished_at.is_not(None),
                                       jobs.c.kind == JobKind.AUDIT.value)
                                .order_by(jobs.c.finished_at.desc()).limit(limit)).all()
        return [float(r[0]) for r in rows]


class ReportTooLarge(ValueError):
    pass


_REUSED = '{"$reused_from": '


def _reference(holder: str) -> str:
    """The report row of a duplicate: the id of the job that holds the report text."""
    return _REUSED + json.dumps(holder) + "}"


def _reused_from(text: str | None) -> str | None:
    if text is None or not text.startswith(_REUSED):
        return None
    return str(json.loads(text)["$reused_from"])


def bounded_report_json(report: Report | dict[str, Any], max_bytes: int) -> str:
    """The report (an audit's, or a reference run's card) as JSON text of at most ``max_bytes``: past it an
    audit's saliency examples (the only part that can be large) are dropped with a note in the JSON's top-level
    ``notes``; a report still too large raises ``ReportTooLarge``."""
    data = report.to_json() if isinstance(report, Report) else report
    text = json.dumps(data)
    if len(text) <= max_bytes:
        return text
    if isinstance(report, Report) and report.saliency_examples:
        note = (f"saliency_examples were dropped: the report was {len(text)} bytes, more than the service "
                f"stores ({max_bytes} bytes, AUDIT_MAX_REPORT_MB)")
        text = json.dumps({**data, "saliency_examples": [], "notes": [*(data.get("notes") or []), note]})
        if len(text) <= max_bytes:
            return text
    raise ReportTooLarge(f"the report is {len(text)} bytes, more than the service stores ({max_bytes} bytes, "
                         f"AUDIT_MAX_REPORT_MB); audit fewer shifts or ask the operator to raise the cap")


#: SQLite's words for a damaged file (as opposed to busy / locked / full)
_DAMAGED_MARKERS = ("malformed", "not a database", "disk i/o error", "corrupt")


def is_damaged(exc: BaseException) -> bool:
    text = str(getattr(exc, "orig", exc)).lower()
    return any(m in text for m in _DAMAGED_MARKERS)
