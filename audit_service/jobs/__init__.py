"""Audit jobs: states, the SQL job store, the content-addressed blob store, executors and workers."""

from .blobs import BlobStore, BlobTooLarge
from .settings import Settings
from .states import READY_STATES, UNREADY_STATES, JobKind, JobStatus
from .store import DEFAULT_TENANT, Job, JobError, JobStore, JobSummary, QueueFull, TenantLimit

__all__ = ["BlobStore", "BlobTooLarge", "Settings", "JobKind", "JobStatus", "READY_STATES", "UNREADY_STATES",
           "Job", "JobStore", "JobError", "JobSummary", "QueueFull", "TenantLimit", "DEFAULT_TENANT"]
