"""Input shifts (CIFAR-10-C style severities, the paper's blend, pure uniform noise), scaled to the probes.

See :mod:`audit_service.engine.shifts.registry` for the severity table.
"""

from .registry import (
    SEVERITIES,
    applicable_default_shifts,
    apply_shift,
    severity_parameter,
    shift_catalogue,
    uniform_noise,
    validate_shift,
)
from .stats import ProbeStats

__all__ = [
    "ProbeStats",
    "SEVERITIES",
    "applicable_default_shifts",
    "apply_shift",
    "severity_parameter",
    "shift_catalogue",
    "uniform_noise",
    "validate_shift",
]
