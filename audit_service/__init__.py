"""Invariance audit service: is a classifier's symmetry genuine, learned, or absent?

The Python API (imported lazily, so ``import audit_service`` and the CLI start without torch)::

    from audit_service import audit, symmetrize, logit_invariance_loss, OrbitInvariance, build_group
    result = audit(model, "C4", probes, labels)      # an nn.Module, a file path or bytes
    result.verdict.label, result.condition("clean").LI_normalized, result.to_html()

Layers, bottom up (import-linter keeps them, pyproject.toml): ``audit_service.engine`` (groups, shifts,
runtimes, metrics, sweep, verdict, report, this API; no web dependencies), ``audit_service.adapters`` (the
HTTP client, the MLflow registry), ``audit_service.reference`` (the reference runs), ``audit_service.jobs``
(the sandboxed job runner), ``audit_service.service`` (the web tier) and ``audit_service.cli`` on top.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

#: public name -> module that defines it
_API = {
    "audit": "audit_service.engine.api",
    "AuditResult": "audit_service.engine.result",
    "Verdict": "audit_service.engine.result",
    "ConditionResult": "audit_service.engine.result",
    "symmetrize": "audit_service.engine.symmetrization",
    "SymmetrizedModel": "audit_service.engine.symmetrization",
    "logit_invariance_loss": "audit_service.engine.metrics.training",
    "OrbitInvariance": "audit_service.engine.metrics.training",
    "build_group": "audit_service.engine.groups",
    "Group": "audit_service.engine.groups",
    "C4Spec": "audit_service.engine.spec",
    "D4Spec": "audit_service.engine.spec",
    "FlipSpec": "audit_service.engine.spec",
    "TranslationSpec": "audit_service.engine.spec",
    "PermutationSpec": "audit_service.engine.spec",
    "RotationSpec": "audit_service.engine.spec",
    "ProductSpec": "audit_service.engine.spec",
    "AuditError": "audit_service.engine.errors",
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
