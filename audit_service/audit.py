"""The library's front door: ``run_audit`` turns a model file + spec + probes into a report dict.

(Stub signature fixed first so the service and reference runs can build on it; the
implementation lands with the orbit sweep.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .spec import AuditSpec

#: progress(fraction in [0, 1], stage name) — called often; must be cheap.
ProgressFn = Callable[[float, str], None]


def run_audit(
    model_path: str | Path,
    spec: AuditSpec,
    probes: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    second_probes: np.ndarray | None = None,
    progress: ProgressFn | None = None,
) -> dict:
    """Audit one model; return the JSON-ready report (keys: ``spec.REPORT_KEYS``).

    Raises ``AuditError`` subclasses (``ModelError``, ``SpecError``, ``ProbeError``,
    ``ModelRuntimeError``) for anything the client can fix.
    """
    raise NotImplementedError


def load_probe_file(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read probes from .npy (array) or .npz (``x`` or ``probes``, optional ``y`` or ``labels``)."""
    raise NotImplementedError
