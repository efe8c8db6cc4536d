"""The engine process one audit runs in: ``python -m audit_service.jobs.sandbox WORKDIR``.

The worker (``jobs.worker``) starts it in its own session with rlimits on memory (``RLIMIT_AS``)
and CPU time, strips ``AUDIT_*`` variables (no database URL or tokens reach model code), and
kills the whole process group on timeout, cancellation or shutdown, and after every task.

The uploaded model never runs in this process: it is loaded in the **cage** (``jobs.cage``), a child
confined more tightly (writes ``WORKDIR/cage`` only, reads nothing of the task), that answers forward
and gradient requests on a socket pair. This process computes the metrics and the report from the
tensors the cage returns, so nothing the worker reads below is writable by model code. It talks to
its parent only through files in ``WORKDIR``:

* ``task.json``   (in)  ``{"kind": "audit", "engine": "module:function", "spec": {...},
                         "model": path, "model_data": [path]|null, "probes": path|null, "labels": path|null,
                         "second_probes": path|null}`` (``model_data``: the ONNX model's external data files,
                         beside ``model`` under the names the graph gives them),
                         ``{"kind": "validate", "model": path, "input_shape": [...]|null, "max_bytes": n}``
                         (the submission-time model check: load + one zero-batch forward)
                         or ``{"kind": "symmetrize", "model": path, "spec": {...}, "output": path}``
                         or ``{"kind": "reference_run", "name": ..., "epochs": ..., "seed": ...}``
* ``progress.json`` (out) ``{"progress": 0..1, "stage": "..."}``, replaced atomically, throttled
* ``result.json``   (out) ``{"ok": true, "report": {...}, "external_data": [name]?}`` or
                         ``{"ok": false, "error": {type, message, field}}``

Before anything of the task is loaded, audit and validate tasks install ``install_network_guard``
(a ``sys.addaudithook`` hook; see ``jobs.launcher`` for the network namespace around it).

Exit status 0 means ``result.json`` was written; anything else (a signal, no result) is a crash
the parent turns into a failed job with the reason. The status reaches the worker from ``waitpid``
(through the fork server's pipe, or ``Popen``), never from a file.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import stat
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .cage import Cage

from .confine import confine_paths
from .failures import MAX_MESSAGE_CHARS, cap_text, classify_exception  # noqa: F401 - re-exported


class SandboxViolation(PermissionError):
    """Model code (or code it drove) tried something the sandbox refuses."""


#: audit events refused inside the sandbox (network and starting programs)
_REFUSED_EVENTS = frozenset({"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
                             "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
                             "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                             "pty.spawn"})


def _network_guard(event: str, args: tuple) -> None:
    if event == "socket.__new__":
        family = args[1] if len(args) > 1 else None
        if family != 1:  # AF_UNIX (1) is local IPC; everything else (and -1, "the default": AF_INET) is network
            raise SandboxViolation(f"the audit sandbox has no network: refused to open a socket (family "
                                   f"{family})")
        return
    if event in _REFUSED_EVENTS:
        if event.startswith("socket.") and args and _is_unix(args[0]):
            return
        raise SandboxViolation(f"the audit sandbox refuses {event}: models get no network and cannot start "
                               f"programs")


def _is_unix(sock: Any) -> bool:
    import socket

    return getattr(sock, "family", None) == socket.AF_UNIX


_GUARD_INSTALLED = False


def install_network_guard() -> None:
    """Refuse, from now on and for good (audit hooks cannot be removed), Python-level network access
    (non-AF_UNIX sockets, connect/bind/sendto/DNS) and starting programs. This stops Python code —
    our engine, converted ONNX models, anything they import — but not native code that calls the C
    library directly; the network namespace (``jobs.launcher.isolate_network``) stops that."""
    global _GUARD_INSTALLED
    if not _GUARD_INSTALLED:
        sys.addaudithook(_network_guard)
        _GUARD_INSTALLED = True


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


class _Progress:
    """``progress(fraction, stage)`` for the engine: cheap, throttled file writes."""

    def __init__(self, path: Path, min_interval: float = 0.2) -> None:
        self.path, self.min_interval = path, min_interval
        self._last = 0.0
        self._stage = None

    def __call__(self, fraction: float, stage: str) -> None:
        now = time.monotonic()
        if stage == self._stage and now - self._last < self.min_interval:
            return
        self._last, self._stage = now, stage
        try:
            fraction = float(fraction)
        except (TypeError, ValueError):
            fraction = 0.0
        _write_json(self.path, {"progress": max(0.0, min(1.0, fraction)), "stage": str(stage)[:128]})


DEFAULT_ENGINE = "audit_service.engine.audit:run_audit"


def confine_task(task: dict, workdir: Path) -> dict:
    """Close the engine's kernel cage before anything of the task is touched: read the environment and the
    task's inputs, write ``workdir`` only (``jobs.confine``). The cage (``jobs.cage``) nests its own inside."""
    inputs = [task.get(k) for k in ("model", "probes", "labels", "second_probes") if task.get(k)]
    inputs += [str(p) for p in task.get("model_data") or []]  # the ONNX model's external data files
    return confine_paths(inputs, workdir, model=task.get("model"))


def _load_engine(ref: str) -> Callable[..., dict]:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name or "run_audit")


def _load_labels(path: str) -> Any:
    import numpy as np

    if path.endswith(".npz"):
        from ..engine.inputs import load_probe_file

        x, y = load_probe_file(path)
        return y if y is not None else x
    return np.load(path, allow_pickle=False)


def validate_model(task: dict, cage: "Cage | None") -> dict:
    if cage is None:
        raise _no_model()
    shape = task.get("input_shape")
    runner = cage.load(task["model"], device="cpu", max_bytes=task.get("max_bytes"),
                       input_shape=tuple(shape) if shape else None)
    return {"format": runner.format, "input_shape": [int(d) for d in runner.input_shape],
            "num_classes": runner.num_classes}


def _no_model() -> Exception:
    from ..engine.errors import ModelError

    return ModelError("Expected a model file with the task, but it names none", field="model")


def symmetrize_model(task: dict, cage: "Cage | None") -> dict:
    """``{"kind": "symmetrize", "model": path, "spec": {...}, "output": path, "max_bytes": n}``: the orbit
    average of the model over the spec's group as ONNX at ``output``, exported in the cage and copied out
    by this process (a regular file under the size cap; a link the model planted is refused)."""
    from ..engine.spec import parse_audit_spec

    parse_audit_spec(task["spec"])  # the spec's errors are ours to name, before the model is touched
    if cage is None:
        raise _no_model()
    cage.load(task["model"], device="cpu", max_bytes=task.get("max_bytes"))
    inside = cage.directory / "symmetrized.onnx"
    info = cage.symmetrize(task["spec"], inside)
    copy_regular_file(inside, Path(task["output"]), 2 * (task.get("max_bytes") or _max_model_bytes()))
    return info


def _max_model_bytes() -> int:
    from ..engine.runtime.validation import max_model_bytes

    return max_model_bytes()


def copy_regular_file(source: Path, target: Path, max_bytes: int) -> None:
    """Copy what the cage wrote, without following a link it may have planted, up to ``max_bytes``."""
    from ..engine.errors import ModelError

    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as src:
        info = os.fstat(src.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
            raise ModelError(f"Expected the symmetrized export to be a regular file of at most {max_bytes} bytes, "
                             f"but the model's process left something else", field="model")
        with open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def run_task(task: dict, progress: Callable[[float, str], None], cage: "Cage | None") -> dict:
    if task["kind"] == "reference_run":
        from ..reference.reproduce import train_reference_run

        return train_reference_run(task["name"], epochs=task.get("epochs"), seed=task.get("seed"),
                                   progress=progress)
    if task["kind"] == "validate":
        return validate_model(task, cage)
    if task["kind"] == "symmetrize":
        return symmetrize_model(task, cage)
    from ..engine.inputs import AuditRequest, load_probe_file
    from ..engine.spec import parse_audit_spec

    spec = parse_audit_spec(task["spec"])
    probes = labels = second = None
    if task.get("probes"):
        probes, labels = load_probe_file(task["probes"])
    if task.get("labels"):
        labels = _load_labels(task["labels"])
    if task.get("second_probes"):
        second, _ = load_probe_file(task["second_probes"])
    engine = _load_engine(task.get("engine") or DEFAULT_ENGINE)
    progress(0.0, "loading model")
    request = AuditRequest(task["model"], spec, probes=probes, labels=labels, second_probes=second,
                           **({"load": cage.load} if cage is not None else {}))
    return engine(request, progress=progress)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m audit_service.jobs.sandbox WORKDIR", file=sys.stderr)
        return 2
    workdir = Path(argv[0])
    sys.stdout, sys.stderr = _Tolerant(sys.stdout), _Tolerant(sys.stderr)
    task = json.loads((workdir / "task.json").read_text())
    progress = _Progress(workdir / "progress.json")
    cage = None
    try:
        if task.get("kind") != "reference_run":  # our own training code needs no cage; uploaded models do
            from .cage import start_cage
            from .confine import load_seccomp

            load_seccomp()  # finds libseccomp with a subprocess, which the guard refuses from now on
            install_network_guard()
            _load_engine(task.get("engine") or DEFAULT_ENGINE)  # trusted code, imported before the cage closes
            confine_task(task, workdir)
            if task.get("model"):  # forked now, single-threaded, inside this process's cage: its own nests in ours
                data = {Path(p).name: str(p) for p in task.get("model_data") or []}
                cage = start_cage(workdir / "cage", [os.path.realpath(task["model"]),
                                                     *(os.path.realpath(p) for p in data.values())], model_data=data)
        report = run_task(task, progress, cage)
        payload = {"ok": True, "report": report}
        if cage is not None and cage.external_data is not None:  # the data files the graph named (the service
            payload["external_data"] = list(cage.external_data)  # keeps only those of what it staged)
        try:
            text = json.dumps(payload, allow_nan=False)
        except ValueError:  # NaN/Inf in the report: JSON has no such numbers, make them null
            text = json.dumps(_finite(payload))
        tmp = workdir / "result.tmp"
        tmp.write_text(text)
        os.replace(tmp, workdir / "result.json")
    except BaseException as exc:  # noqa: BLE001 - everything becomes a reason in the job
        traceback.print_exc(file=sys.stderr)
        try:
            _write_json(workdir / "result.json", {"ok": False, "error": classify_exception(exc)})
        except BaseException:  # noqa: BLE001 - e.g. MemoryError again, or a full disk; the parent reports the exit
            return RESULT_UNWRITTEN
    finally:
        if cage is not None:
            cage.close()
    return 0


#: the exit status of an engine that could not write its result (the worker says "disk full?")
RESULT_UNWRITTEN = 3


class _Tolerant:
    """stdout / stderr that drop what no longer fits: once a model has printed its log up to the file
    cap (RLIMIT_FSIZE), a warning of ours must not turn into an exception that fails the audit."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _finite(value: Any) -> Any:
    import math

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
