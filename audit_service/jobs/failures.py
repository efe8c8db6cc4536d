"""How a failure inside a sandbox becomes a job's reason: exceptions and signals to short, capped text.

Shared by the engine process (``jobs.sandbox``), the model cage (``jobs.cage``) and the worker (``jobs.worker``),
so that the same crash reads the same wherever it was seen.
"""

from __future__ import annotations

import os
import signal

#: model-controlled text (exception messages, prints) never reaches a client or a log longer than this
MAX_MESSAGE_CHARS = 600

_OOM_MARKERS = ("can't allocate memory", "out of memory", "cannot allocate memory", "bad_alloc",
                "std::bad_alloc", "failed to allocate")

SIGNAL_REASONS = {
    signal.SIGSEGV: "crashed with a segmentation fault (SIGSEGV) inside the model runtime",
    signal.SIGABRT: "aborted (SIGABRT) inside the model runtime; with a memory limit set this is often "
                    "an allocation that failed",
    signal.SIGBUS: "crashed with a bus error (SIGBUS)",
    signal.SIGILL: "crashed with an illegal instruction (SIGILL)",
    signal.SIGFPE: "crashed with a floating-point exception (SIGFPE)",
    signal.SIGXCPU: "exceeded its CPU-time limit (SIGXCPU)",
    signal.SIGKILL: "was killed (SIGKILL), most often by the kernel's out-of-memory killer",
}


def cap_text(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more characters cut]"


def signal_reason(rc: int) -> tuple[str, str]:
    """(error type, phrase) for a process that ended with ``rc`` < 0 (killed by signal ``-rc``)."""
    try:
        sig = signal.Signals(-rc)
    except ValueError:
        return "crashed", f"was killed by signal {-rc}"
    kind = {signal.SIGXCPU: "cpu_time_limit", signal.SIGKILL: "killed"}.get(sig, "crashed")
    return kind, SIGNAL_REASONS.get(sig, f"was killed by signal {sig.name}")


def classify_exception(exc: BaseException) -> dict:
    """``{type, message, field}`` of an exception raised while running a task."""
    from ..engine.errors import AuditError

    text = str(exc)
    if isinstance(exc, MemoryError) or any(m in text.lower() for m in _OOM_MARKERS):
        limit = os.environ.get("AUDIT_SANDBOX_MEMORY_MB")
        where = f" of {limit} MiB (AUDIT_JOB_MEMORY_MB)" if limit and limit != "0" else ""
        return {"type": "out_of_memory",
                "message": f"the audit ran out of memory under the limit{where}: lower options.batch_size / "
                           f"options.probe_chunk / options.n_probes, or ask the operator to raise the limit "
                           f"({type(exc).__name__}: {text[:300]})", "field": None}
    if isinstance(exc, AuditError):
        return {"type": type(exc).__name__, "message": cap_text(exc.message), "field": exc.field}
    if isinstance(exc, NotImplementedError):
        return {"type": "not_implemented", "message": f"not implemented in this version: {text[:300]}",
                "field": None}
    return {"type": "audit_failed",
            "message": f"the audit raised {type(exc).__name__}: {text[:500]}", "field": None}
