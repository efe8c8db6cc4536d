"""Invariance audit service: is a classifier's symmetry genuine, learned, or absent?

The Python API (imported lazily, so ``import audit_service`` and the CLI start without torch)::

    from audit_service import audit, symmetrize, logit_invariance_loss, OrbitInvariance, build_group
    result = audit(model, "C4", probes, labels)      # an nn.Module, a file path or bytes
    result.verdict.label, result.condition("clean").LI_normalized, result.to_html()

The core library (groups, shifts, runtime, metrics, sweep, verdict, report, this API) has no web
dependencies; ``audit_service.service``, ``audit_service.jobs`` and ``audit_service.reference`` sit on top.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_API = {
    "audit": "audit_service.api",
    "AuditResult": "audit_service.result",
    "Verdict": "audit_service.result",
    "ConditionResult": "audit_service.result",
    "symmetrize": "audit_service.symmetrization",
    "SymmetrizedModel": "audit_service.symmetrization",
    "logit_invariance_loss": "audit_service.metrics.training",
    "OrbitInvariance": "audit_service.metrics.training",
    "build_group": "audit_service.groups",
    "Group": "audit_service.groups",
    "C4Spec": "audit_service.spec",
    "D4Spec": "audit_service.spec",
    "FlipSpec": "audit_service.spec",
    "TranslationSpec": "audit_service.spec",
    "PermutationSpec": "audit_service.spec",
    "RotationSpec": "audit_service.spec",
    "ProductSpec": "audit_service.spec",
    "AuditError": "audit_service.errors",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'audit_service' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
