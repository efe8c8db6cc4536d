"""Job states, their groups and the allowed transitions (checked in one place: ``JobStore.transition``)."""

from __future__ import annotations

from enum import Enum


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:  # so f-strings and SQL parameters read as the plain value
        return self.value


#: states a job never leaves
READY_STATES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
#: states with work still to do
UNREADY_STATES = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})
EXCEPTION_STATES = frozenset({JobStatus.FAILED, JobStatus.CANCELLED})

#: from -> allowed targets. RUNNING -> QUEUED is a retry (lost worker or graceful shutdown).
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


class JobKind(str, Enum):
    AUDIT = "audit"
    REFERENCE_RUN = "reference_run"

    def __str__(self) -> str:
        return self.value


def check_transition(source: JobStatus, target: JobStatus) -> None:
    if target not in TRANSITIONS[source]:
        raise ValueError(f"Expected a transition allowed from {source.value} "
                         f"({', '.join(sorted(t.value for t in TRANSITIONS[source])) or 'none'}), "
                         f"but got {target.value}")
