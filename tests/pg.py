"""A private, throwaway PostgreSQL server for the tests: ``initdb`` in a temp dir, ``pg_ctl start`` on a
free loopback port (its Unix socket in that dir too), stopped and deleted at the end. Nothing is shared
with a system cluster. As root the server runs as the unprivileged ``postgres`` user (PostgreSQL refuses
to run as root). ``.ci/run`` installs the server binaries; without them the tests that need it skip.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from conftest import free_port


def find_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<v>/bin`` with ``initdb`` and ``pg_ctl`` (or ``pg_config --bindir``)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0, reverse=True)
    for initdb in candidates:
        bindir = Path(initdb).parent
        if (bindir / "pg_ctl").exists():
            return bindir
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    return None


class PostgresServer:
    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.as_root = os.geteuid() == 0
        self.dir = Path(tempfile.mkdtemp(prefix="audit-pg-"))
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self.data, self.sockets, self.log = self.dir / "data", self.dir / "sock", self.dir / "server.log"
        self.port = 0

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd] if shutil.which("runuser") else \
                ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in cmd)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(self.dir))
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{log}")
        return proc

    def start(self) -> "PostgresServer":
        if self.as_root:  # owned by postgres, so that the server may write there
            os.makedirs(self.sockets)
            shutil.chown(self.sockets, "postgres", "postgres")
        else:
            self.sockets.mkdir()
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                  "--locale=C", "--no-sync")
        for attempt in range(5):  # a free port may be taken by someone else before the server binds it
            self.port = free_port()
            opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets} -c fsync=off "
                    f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60", "start")
                break
            except RuntimeError:
                if attempt == 4:
                    raise
        return self

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; its SQLAlchemy URL."""
        import psycopg

        name = name or f"audit_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Close this process's engines on ``url`` and drop its database (other sessions are ended)."""
        import psycopg

        from audit_service.jobs import store as store_module

        with store_module._ENGINES_LOCK:
            for key in [k for k in store_module._ENGINES if k[0] == url]:
                store_module._ENGINES.pop(key).dispose()
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        try:
            if self.data.exists() and (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "60", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def serve_postgres() -> Iterator[PostgresServer]:
    """Generator for a session fixture: a started server, stopped and removed afterwards."""
    import pytest

    bindir = find_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed; .ci/run installs the "
                    "'postgresql' package")
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()

