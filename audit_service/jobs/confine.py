"""Kernel confinement of a sandbox child: Landlock for the file system, seccomp for sockets and
process-level escapes.

Why this exists: a TorchScript or ``torch.export`` model is a program. ``aten::from_file`` alone
reads or creates any file the service user can reach, and no Python hook sees it (the op is C++).
So, before a task's model is loaded, the child restricts *itself* through the kernel:

* **Landlock** (unprivileged, per process, inherited by every thread and child, irrevocable): the
  child may read and execute the Python environment (interpreter, standard library, site-packages,
  the ``audit_service`` package), the system libraries, ``/proc``, ``/sys`` and a few device nodes;
  read its own input files; and read and write only its own work dir. Everything else is refused
  by the kernel: the data dir (database, other jobs' blobs), the tokens file, home directories,
  ``/etc`` (beyond the loader's cache), the venv for writing. With Landlock ABI 4+ TCP bind and
  connect are refused too, and with ABI 6+ signals and abstract unix sockets cannot leave the
  sandbox. Landlock also blocks ``ptrace`` of processes outside the domain, so
  ``/proc/<parent>/environ`` and ``/proc/<parent>/mem`` stay closed.
* **seccomp** (through libseccomp, ``pyseccomp``): ``socket()`` of any family fails (the network
  namespace already has no route; this also closes pathname unix sockets, which Landlock below
  ABI 9 does not cover), and so do ``ptrace``, ``process_vm_*``, ``bpf``, ``perf_event_open``,
  ``userfaultfd``, key management, ``mount``/``unshare``/``setns`` and module loading.

``confine`` applies both and returns what it applied; the sandbox refuses to run a code-bearing
model (TorchScript, ``.pt2``) when the file-system part could not be applied, unless the operator
opted in with ``AUDIT_ALLOW_UNCONFINED_MODELS=1`` (fail closed). I use ``ctypes`` for Landlock
rather than the PyPI ``landlock`` package: that one is a 2025 development release that does not
know ABI 4-7 (network rules, scoping), and three syscalls do not justify a dependency here.
"""

from __future__ import annotations

import ctypes
import json
import errno
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

# syscall numbers are shared by every architecture for these (added after the unified table, 5.13)
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

# file-system access rights, by the ABI version that introduced them
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_REMOVE_DIR, _FS_REMOVE_FILE, _FS_MAKE_CHAR, _FS_MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
_FS_MAKE_REG, _FS_MAKE_SOCK, _FS_MAKE_FIFO, _FS_MAKE_BLOCK, _FS_MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
_FS_REFER, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1

#: rights that make sense on a regular file (a rule on a file with directory rights is EINVAL)
_FILE_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
READ = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
WRITE = (READ | _FS_WRITE_FILE | _FS_REMOVE_DIR | _FS_REMOVE_FILE | _FS_MAKE_DIR | _FS_MAKE_REG
         | _FS_MAKE_SYM | _FS_REFER | _FS_TRUNCATE)
DEVICE = _FS_READ_FILE | _FS_WRITE_FILE | _FS_IOCTL_DEV

#: system locations a Python process with torch and onnxruntime reads (libraries, loader cache, CPU
#: topology, time zone); nothing here holds the service's data or secrets
SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/opt", "/proc", "/sys",
               "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")
#: device nodes a model may use: the null/zero/random devices and, on GPU machines, NVIDIA's
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
DEVICE_PREFIXES = ("nvidia", "dri")


class ConfinementError(OSError):
    """The kernel refused a confinement step that was asked for."""


@dataclass
class Confinement:
    """What ``confine`` applied, for the report and for the fail-closed decision."""

    landlock_abi: int = 0
    filesystem: bool = False
    network: bool = False
    scoped: bool = False
    seccomp: bool = False
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"landlock_abi": self.landlock_abi, "filesystem": self.filesystem, "tcp": self.network,
                "signals_scoped": self.scoped, "seccomp": self.seccomp, "notes": list(self.notes)}


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def landlock_abi() -> int:
    """The Landlock ABI version the kernel offers; 0 when none (old kernel, disabled, not Linux)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        abi = _libc().syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    except (OSError, AttributeError):
        return 0
    return int(abi) if abi > 0 else 0


def python_environment() -> list[str]:
    """Directories the interpreter and its packages are read from (resolved, deduplicated)."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                               getattr(sys, "base_exec_prefix", sys.prefix))}
    roots = set(prefixes)
    # site-packages outside the prefixes (a user site, a vendored tree) count only when they look
    # like one; a bare PYTHONPATH checkout or "/" is never granted as a whole
    for entry in sys.path:
        real = os.path.realpath(entry) if entry else ""
        if real and os.path.isdir(real) and Path(real).name in ("site-packages", "dist-packages"):
            roots.add(real)
    roots.add(str(Path(__file__).resolve().parents[1]))  # the audit_service package itself
    return sorted(roots)


def _is_within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def read_paths(protected: Iterable[str]) -> list[str]:
    """The read-only part of the rule set: the Python environment and ``SYSTEM_READ``, minus any
    entry that contains a ``protected`` path (a repository checkout on ``sys.path`` that also holds
    the data dir is replaced by its ``audit_service`` package)."""
    guarded = [os.path.realpath(p) for p in protected if p]
    keep = []
    for path in [*python_environment(), *SYSTEM_READ]:
        if not os.path.exists(path):
            continue
        real = os.path.realpath(path)
        if any(_is_within(g, real) for g in guarded):
            continue
        keep.append(real)
    return keep


def _device_paths() -> list[str]:
    paths = [d for d in DEVICES if os.path.exists(d)]
    try:
        paths += [f"/dev/{n}" for n in os.listdir("/dev") if n.startswith(DEVICE_PREFIXES)]
    except OSError:
        pass
    return paths


def _add_rule(libc: ctypes.CDLL, ruleset_fd: int, path: str, access: int, handled: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # a path that does not exist grants nothing
    try:
        if not os.path.isdir(path):
            access &= _FILE_RIGHTS
        attr = _PathBeneathAttr(access & handled, fd)
        if libc.syscall(_SYS_ADD_RULE, ruleset_fd, _RULE_PATH_BENEATH, ctypes.byref(attr), 0) != 0:
            err = ctypes.get_errno()
            raise ConfinementError(err, f"landlock_add_rule({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def apply_landlock(readable: Iterable[str], writable: Iterable[str], abi: int | None = None) -> Confinement:
    """Restrict this process (and its future threads and children) to the given paths, for good."""
    result = Confinement(landlock_abi=landlock_abi() if abi is None else abi)
    if result.landlock_abi <= 0:
        result.notes.append("the kernel offers no Landlock: file access is not confined")
        return result
    libc = _libc()
    handled = _FS_BY_ABI.get(result.landlock_abi, _FS_BY_ABI[5])
    attr = _RulesetAttr(handled_access_fs=handled,
                        handled_access_net=(_NET_BIND_TCP | _NET_CONNECT_TCP) if result.landlock_abi >= 4 else 0,
                        scoped=(_SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL) if result.landlock_abi >= 6 else 0)
    size = ctypes.sizeof(_RulesetAttr) if result.landlock_abi >= 6 else (16 if result.landlock_abi >= 4 else 8)
    ruleset = libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        err = ctypes.get_errno()
        raise ConfinementError(err, f"landlock_create_ruleset: {os.strerror(err)}")
    try:
        for path in readable:
            _add_rule(libc, ruleset, path, READ, handled)
        for path in _device_paths():
            _add_rule(libc, ruleset, path, DEVICE, handled)
        for path in writable:
            _add_rule(libc, ruleset, path, WRITE, handled)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise ConfinementError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
        if libc.syscall(_SYS_RESTRICT_SELF, ruleset, 0) != 0:
            err = ctypes.get_errno()
            raise ConfinementError(err, f"landlock_restrict_self: {os.strerror(err)}")
    finally:
        os.close(ruleset)
    result.filesystem = True
    result.network = result.landlock_abi >= 4
    result.scoped = result.landlock_abi >= 6
    return result


#: system calls a model never needs; each fails with EPERM instead of running
SECCOMP_DENY = ("socket", "ptrace", "process_vm_readv", "process_vm_writev", "bpf", "perf_event_open",
                "userfaultfd", "keyctl", "add_key", "request_key", "mount", "umount2", "pivot_root", "unshare",
                "setns", "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
                "open_by_handle_at", "name_to_handle_at", "io_uring_setup", "chroot", "swapon", "swapoff",
                "reboot", "acct", "quotactl", "fanotify_init", "mount_setattr", "move_mount", "open_tree",
                "fsopen", "fsmount",
                # a process that leaves its group escapes the kill that ends every task
                "setsid", "setpgid")


def load_seccomp() -> object | None:
    """Import ``pyseccomp`` (it looks libseccomp up with ``ldconfig``, a subprocess: do this before
    the audit hook and the cage are in place); None when the library is missing."""
    try:
        import pyseccomp
    except Exception:  # noqa: BLE001 - libseccomp missing: confine() says so, Landlock still holds
        return None
    return pyseccomp


def apply_seccomp() -> str | None:
    """Install the deny-list filter (inherited by threads started later); None on success, else why not."""
    seccomp: Any = load_seccomp()
    if seccomp is None:
        return "seccomp unavailable: libseccomp (libseccomp2) is not installed"
    try:
        flt = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        for name in SECCOMP_DENY:
            try:
                flt.add_rule(seccomp.ERRNO(errno.EPERM), name)
            except (ValueError, RuntimeError, OSError):
                continue  # a call this architecture does not have
        flt.load()
    except Exception as exc:  # noqa: BLE001
        return f"seccomp filter not loaded ({type(exc).__name__}: {exc})"
    return None


def confine(workdir: str | Path, inputs: Iterable[str], protected: Iterable[str] = (),
            landlock: bool = True) -> Confinement:
    """Landlock (read: environment + ``inputs``; write: ``workdir``) and seccomp, in that order.
    ``protected`` names paths that no read rule may contain (the data dir, the tokens file);
    ``landlock=False`` (the operator's ``AUDIT_SANDBOX_LANDLOCK=off``) skips the file rules."""
    workdir = os.path.realpath(workdir)
    inputs = [os.path.realpath(p) for p in inputs if p]
    if landlock:
        result = apply_landlock(read_paths([workdir, *protected]) + inputs, [workdir])
    else:
        result = Confinement(notes=["Landlock switched off by the operator (AUDIT_SANDBOX_LANDLOCK=off)"])
    why_not = apply_seccomp()
    result.seccomp = why_not is None
    if why_not:
        result.notes.append(why_not)
    return result


# ----------------------------------------------------------------------------- a process confines itself
#: formats that carry a program (TorchScript, torch.export): zip archives; ONNX is a protobuf whose
#: ops cannot reach files (external data is read by the loader, from the model's own folder only)
_CODE_MAGIC = b"PK"
ALLOW_UNCONFINED_ENV = "AUDIT_ALLOW_UNCONFINED_MODELS"
PROTECTED_ENV = "AUDIT_SANDBOX_PROTECTED"
LANDLOCK_ENV = "AUDIT_SANDBOX_LANDLOCK"


def confine_paths(inputs: list[str], workdir: Path, model: str | None) -> dict:
    """Landlock (read the environment and ``inputs``, write ``workdir``) and seccomp for this process. A
    code-bearing ``model`` (TorchScript, ``.pt2``) is refused when the file system could not be confined,
    unless the operator opted in (``AUDIT_ALLOW_UNCONFINED_MODELS=1``)."""
    from ..engine.errors import AuditError

    protected = [p for p in os.environ.get(PROTECTED_ENV, "").split(os.pathsep) if p]
    try:
        applied = confine(workdir, inputs, protected, landlock=os.environ.get(LANDLOCK_ENV) != "off").as_dict()
    except ConfinementError as exc:
        applied = {"filesystem": False, "notes": [str(exc)]}
    os.environ["AUDIT_SANDBOX_CONFINEMENT"] = json.dumps(applied)
    if not applied["filesystem"] and os.environ.get(ALLOW_UNCONFINED_ENV) != "1" and model and _carries_code(model):
        raise AuditError(
            "Expected an ONNX model on this server: TorchScript and torch.export (.pt2) models are programs, "
            "and this kernel cannot confine their file access (no Landlock: "
            f"{'; '.join(applied['notes']) or 'unavailable'}). Export to ONNX, or ask the operator to run on "
            f"Linux 5.13+ with Landlock enabled (or to opt in with {ALLOW_UNCONFINED_ENV}=1)", field="model")
    return applied


def _carries_code(model: str) -> bool:
    try:
        with open(model, "rb") as fh:
            return fh.read(2) == _CODE_MAGIC
    except (OSError, TypeError):
        return True  # unknown: fail closed


def seal_descriptors(keep: set[int]) -> None:
    """Point every open descriptor but ``keep`` at a read-only ``/dev/null``: what a library opened before the
    fork (onnxruntime's SQLite file, the fork server's pipes) can no longer be read or written through, and
    a library that still writes to its number writes nowhere instead of into a file opened later."""
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd in keep or fd == null:
                continue
            try:
                os.dup2(null, fd)
            except OSError:
                pass
    finally:
        os.close(null)


def die_with_parent() -> None:
    """``PR_SET_PDEATHSIG``: the kernel kills this process when the one that forked it exits."""
    import signal

    _libc().prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
