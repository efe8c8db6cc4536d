"""Starting sandboxed child processes (``jobs.sandbox``), for audits and for the submission-time model check.

Every sandbox child, however it is started:

* runs in its own session (killed with its process group), with ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``,
  no core dumps, and ``PR_SET_PDEATHSIG`` (it dies with whoever started it);
* gets its own empty network namespace when the kernel allows unprivileged user namespaces
  (``unshare(CLONE_NEWUSER | CLONE_NEWNET)``: no interface but a down loopback, so no connection of
  any kind can leave it, from Python or native code) — ``AUDIT_SANDBOX_NETNS=off`` skips it;
* installs a Python audit hook (``sandbox.install_network_guard``) that refuses socket creation for
  anything but AF_UNIX, connect/bind/sendto/getaddrinfo, and ``subprocess``/``os.exec*``/``os.system``,
  whether or not the namespace could be made;
* sees only a scrubbed environment (no ``AUDIT_*`` except the runtime's own knobs: no database URL,
  broker URL or tokens), its own ``TMPDIR`` inside its work dir, no descriptor of its parent's beyond
  stdin/stdout/stderr (``seal_descriptors``), and talks to its parent only through files in that work dir;
* ends with its whole process group gone: ``Handle.end`` kills the group and waits, with deadlines, for
  the leader's exit status and for the group to be empty, whatever the child reported.

The exit status comes from ``waitpid`` (``Popen``, or the fork server's, relayed on its pipe), never from
a file a child could write.

Two ways to start one, same code inside:

* ``ForkServer`` (``AUDIT_WARM_SANDBOX=1``, the default): a helper process that imported torch,
  onnxruntime and the engine once forks a fresh child per task (milliseconds instead of seconds of
  imports); the helper never runs model code itself and stays single-use per child. It is the
  subreaper of everything its children start, reaps them, and writes ``{"exit": pid, "rc": rc}`` on
  its stdout for each child it started.
* ``spawn_fresh``: ``python -m audit_service.jobs.sandbox WORKDIR`` (the fallback, and ``=0``).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .confine import seal_descriptors

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger("audit_service.launcher")

#: the directory holding ``audit_service``: child processes run exactly this code
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
#: modules the fork server imports once, so that its children start warm
PRELOAD = ("numpy", "torch", "onnx", "onnxruntime", "audit_service.engine.runtime", "audit_service.engine.audit",
           "audit_service.jobs.sandbox", "pyseccomp")


@dataclass(frozen=True)
class Limits:
    memory_mb: int = 0
    cpu_s: int = 0
    netns: bool = True
    env: dict = field(default_factory=dict)  # per-task additions (TMPDIR...)
    #: largest file the child may write (RLIMIT_FSIZE; its stderr.log included), MiB; 0 = no limit
    file_mb: int = 0


def task_env(workdir: Path, settings: "Settings") -> dict[str, str]:
    """Per-task environment: scratch, home and caches inside ``workdir`` (the only place the
    confined child may write), the paths its file rules must never contain, and the operator's
    confinement switches (``jobs.sandbox.confine_task`` reads them)."""
    tmp = str(Path(workdir).resolve() / "tmp")
    env = {"TMPDIR": tmp, "HOME": tmp, "XDG_CACHE_HOME": tmp, "CUDA_CACHE_PATH": tmp,
           "TORCHINDUCTOR_CACHE_DIR": tmp,
           "AUDIT_SANDBOX_PROTECTED": os.pathsep.join(settings.sandbox_protected_paths),
           "AUDIT_SANDBOX_LANDLOCK": settings.sandbox_landlock}
    if settings.allow_unconfined_models:
        env["AUDIT_ALLOW_UNCONFINED_MODELS"] = "1"
    return env


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def isolate_network() -> bool:
    """Move this (single-threaded) process into a new user + network namespace; False when refused."""
    libc = _libc()
    if libc is None or not hasattr(libc, "unshare"):
        return False
    return libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0


def apply_limits(limits: Limits) -> None:  # pragma: no cover - runs in the child
    if limits.memory_mb > 0:
        cap = limits.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    if limits.cpu_s > 0:
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 5))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if limits.file_mb > 0:  # a file past the cap fails with EFBIG instead of killing the child
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        cap = limits.file_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (cap, cap))
    libc = _libc()
    if libc is not None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if limits.netns:
        os.environ["AUDIT_SANDBOX_NETNS_ACTIVE"] = "1" if isolate_network() else "0"


#: the only variables a sandbox inherits (an allow-list: credentials such as MLFLOW_TRACKING_TOKEN,
#: AWS_*, database or broker URLs and the service's tokens never reach model code)
SANDBOX_ENV_NAMES = ("PATH", "LANG", "LANGUAGE", "TZ", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "SYSTEMROOT")
SANDBOX_ENV_PREFIXES = ("LC_", "PYTHON", "OMP_", "MKL_", "OPENBLAS_", "KMP_", "CUDA_", "NVIDIA_", "CUBLAS_",
                        "CUDNN_", "TORCH_", "ORT_", "AUDIT_ORT_", "AUDIT_REFERENCE_", "AUDIT_MAX_MODEL_BYTES",
                        "AUDIT_SANDBOX_MEMORY_MB")


def sandbox_env(extra: dict | None = None) -> dict[str, str]:
    """The runtime's part of the parent's environment (``SANDBOX_ENV_*``), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k in SANDBOX_ENV_NAMES or k.startswith(SANDBOX_ENV_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


#: how long ``Handle.end`` waits for a killed group to be gone
END_TIMEOUT_S = 30.0


class Handle:
    """A started sandbox child: ``poll()`` -> exit status or None, ``kill()`` its process group."""

    pid: int

    def poll(self) -> int | None:
        raise NotImplementedError

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            rc = self.poll()
            if rc is not None:
                return rc
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError
            time.sleep(0.02)

    def end(self, timeout: float = END_TIMEOUT_S) -> int:
        """Kill the whole process group (the engine, its cage, anything they started), then wait until the
        leader's status is known and no process of the group is left. Its exit status; ``SandboxStuck``
        when the group outlives ``timeout`` (a process in uninterruptible sleep)."""
        self.kill()
        deadline = time.monotonic() + timeout
        try:
            rc = self.wait(timeout)
        except TimeoutError:
            raise SandboxStuck(f"the sandbox (pid {self.pid}) did not exit within {timeout:g} s of SIGKILL") from None
        while group_alive(self.pid):
            if time.monotonic() > deadline:
                raise SandboxStuck(f"processes of the sandbox's group {self.pid} outlived SIGKILL by {timeout:g} s")
            self.kill()
            time.sleep(0.02)
        return rc


class SandboxStuck(OSError):
    """A sandbox's processes could not be ended: its job fails and says so."""


def group_alive(pgid: int) -> bool:
    """Whether any process (zombies aside) is left in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg succeeds on zombies waiting for their reaper: look for a live member
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


class _PopenHandle(Handle):
    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.pid = proc, proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError from None


def spawn_fresh(workdir: Path, limits: Limits) -> Handle:
    env = sandbox_env(limits.env)
    with open(workdir / "stderr.log", "ab") as err:
        proc = subprocess.Popen([sys.executable, "-m", "audit_service.jobs.sandbox", str(workdir)],
                                cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                start_new_session=True, preexec_fn=lambda: apply_limits(limits))
    return _PopenHandle(proc)


class _ForkedHandle(Handle):
    """A child of the fork server: its exit status is the server's ``waitpid``, relayed on the server's pipe."""

    def __init__(self, pid: int, server: "ForkServer") -> None:
        self.pid, self.server = pid, server
        self._rc: int | None = None

    def poll(self) -> int | None:
        if self._rc is None:
            self._rc = self.server.exit_status(self.pid)
        return self._rc


class ForkServer:
    """One warm helper process per owning process; thread-safe; restarted when it dies.

    Its stdout carries two kinds of lines, read by one thread: ``{"pid": n}`` answers a start request
    (in order), ``{"exit": pid, "rc": rc}`` reports a child's end whenever it happens."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._answers: list[int] = []
        self._exits: dict[int, int] = {}
        self._mine: set[int] = set()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _ensure(self) -> subprocess.Popen:
        if not self.alive():
            import tempfile

            self._orphan_all()
            # libraries the server preloads open files under $HOME at import (onnxruntime keeps a SQLite
            # file open in ~/.cache): a throwaway home, removed by the server once its imports are done
            home = tempfile.mkdtemp(prefix="audit-forkserver-")
            env = sandbox_env({"HOME": home, "XDG_CACHE_HOME": home, "AUDIT_FORKSERVER_HOME": home})
            self._proc = proc = subprocess.Popen([sys.executable, "-m", "audit_service.jobs.launcher"],
                                                 env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                 stderr=None, start_new_session=True,
                                                 preexec_fn=_die_with_parent, cwd="/")
            threading.Thread(target=self._read, args=(proc,), daemon=True, name="forkserver-reader").start()
        return self._proc

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            with self._changed:
                if "exit" in message:
                    self._exits[int(message["exit"])] = int(message["rc"])
                else:
                    self._answers.append(int(message["pid"]))
                self._changed.notify_all()
        with self._changed:  # the server is gone, and with it (PDEATHSIG) every child it had
            if self._proc is proc:
                self._orphan_all()
            self._changed.notify_all()

    def _orphan_all(self) -> None:
        for pid in self._mine:
            self._exits.setdefault(pid, -signal.SIGKILL)

    def _answer(self, proc: subprocess.Popen, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self._answers:
                left = deadline - time.monotonic()
                if left <= 0 or proc.poll() is not None:
                    proc.kill()
                    raise OSError("the sandbox fork server did not answer")
                self._changed.wait(min(left, 0.5))
            return self._answers.pop(0)

    def warm(self, wait: bool = False, timeout: float = 180.0) -> None:
        """Start the server; with ``wait``, return once its imports are done (it answers a ping)."""
        with self._lock:
            proc = self._ensure()
            if not wait:
                return
            assert proc.stdin is not None
            proc.stdin.write(b'{"ping": true}\n')
            proc.stdin.flush()
            try:
                self._answer(proc, timeout)
            except OSError:
                pass

    def start(self, workdir: Path, limits: Limits, ready_timeout: float = 120.0) -> Handle:
        request = json.dumps({"workdir": str(Path(workdir).resolve()), "memory_mb": limits.memory_mb,
                              "cpu_s": limits.cpu_s, "netns": limits.netns, "env": limits.env,
                              "file_mb": limits.file_mb}) + "\n"
        with self._lock:
            proc = self._ensure()
            assert proc.stdin is not None
            try:
                proc.stdin.write(request.encode())
                proc.stdin.flush()
            except OSError as exc:
                proc.kill()
                raise OSError(f"the sandbox fork server is gone ({exc})") from None
            pid = self._answer(proc, ready_timeout)  # the first call waits for its imports
            if pid <= 0:
                raise OSError("the sandbox fork server could not fork")
            with self._changed:
                self._mine.add(pid)
            return _ForkedHandle(pid, self)

    def exit_status(self, pid: int) -> int | None:
        with self._changed:
            rc = self._exits.pop(pid, None)
            if rc is not None:
                self._mine.discard(pid)
            return rc

    def stop(self) -> None:
        with self._lock:
            if self.alive():
                assert self._proc is not None
                self._proc.kill()
                self._proc.wait()


def _die_with_parent() -> None:  # pragma: no cover - child
    libc = _libc()
    if libc is not None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


_SERVER: ForkServer | None = None
_SERVER_LOCK = threading.Lock()


def fork_server() -> ForkServer:
    with _SERVER_LOCK:
        if _SERVER is None or _SERVER_PID != os.getpid():
            _set_server(ForkServer())
        assert _SERVER is not None
        return _SERVER


_SERVER_PID = -1


def _set_server(server: ForkServer) -> None:
    global _SERVER, _SERVER_PID
    _SERVER, _SERVER_PID = server, os.getpid()


def launch(workdir: Path, limits: Limits, warm: bool = True) -> Handle:
    """Start ``jobs.sandbox`` on ``workdir``: forked from the warm server, or fresh when that fails."""
    if warm:
        try:
            return fork_server().start(workdir, limits)
        except OSError as exc:
            log.warning("warm sandbox unavailable (%s); starting a fresh process", exc)
    return spawn_fresh(workdir, limits)


# ----------------------------------------------------------------------------- the fork server itself
def _serve() -> int:  # pragma: no cover - exercised through ForkServer in the tests
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - a missing layer: children import what they need
            print(f"fork server: preload {name} failed: {exc}", file=sys.stderr)
    home = os.environ.pop("AUDIT_FORKSERVER_HOME", "")
    if home and Path(home).name.startswith("audit-forkserver-"):
        import shutil

        shutil.rmtree(home, ignore_errors=True)  # what the imports keep open stays open, unlinked
    libc = _libc()
    if libc is not None:  # the cages the children fork are reaped here when their engine is gone
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
    children: set[int] = set()
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    buffer = b""
    while True:
        ready, _, _ = select.select([stdin], [], [], 0.05)
        while True:  # reap: every child's status from waitpid, relayed on the pipe (orphans reaped silently)
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in children:
                children.discard(pid)
                rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                stdout.write((json.dumps({"exit": pid, "rc": rc}) + "\n").encode())
                stdout.flush()
        if not ready:
            continue
        chunk = os.read(stdin.fileno(), 65536)
        if not chunk:  # the owner is gone: take the children with us
            for pid in children:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass
            return 0
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            request = json.loads(line)
            if request.get("ping"):  # imports are done: say so
                stdout.write(b'{"pid": 0}\n')
                stdout.flush()
                continue
            workdir = Path(request["workdir"])
            try:
                pid = os.fork()
            except OSError as exc:
                print(f"fork server: fork failed: {exc}", file=sys.stderr)
                pid = -1
            if pid == 0:
                _child(workdir, Limits(int(request["memory_mb"]), int(request["cpu_s"]), bool(request["netns"]),
                                       dict(request.get("env") or {}), int(request.get("file_mb") or 0)))
            if pid > 0:
                children.add(pid)
            stdout.write((json.dumps({"pid": pid}) + "\n").encode())
            stdout.flush()


def _child(workdir: Path, limits: Limits) -> None:  # pragma: no cover - forked child
    rc = 1
    try:
        os.setsid()
        fd = os.open(workdir / "stderr.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # the server's pipes (0, 1) are replaced: a child cannot speak for the server
        os.close(fd)
        os.close(devnull)
        seal_descriptors(keep={0, 1, 2})
        os.chdir(workdir)
        os.environ.update(limits.env)
        if limits.env.get("PYTHONPATH"):  # the interpreter is already running: extend its path too
            sys.path[:0] = [p for p in limits.env["PYTHONPATH"].split(os.pathsep) if p]
        apply_limits(limits)
        import tempfile

        tempfile.tempdir = None  # pick up the new TMPDIR
        from . import sandbox

        rc = sandbox.main([str(workdir)])
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)


if __name__ == "__main__":
    sys.exit(_serve())
