"""The Python API: ``audit(model, group, probes)`` on what a notebook or training loop holds.

``model`` is an ``nn.Module`` in memory, a file path (ONNX, TorchScript, ``.pt2``) or the file's
bytes; ``probes`` and ``labels`` are tensors or arrays; ``group`` is a name (``"C4"``), a spec dict, a spec
object (``C4Spec()``) or a built ``Group`` (``groups.resolve``, as for ``symmetrize`` and the training faces);
every other keyword is an audit option (``n_probes``, ``ig_steps``,
``device``, ...; see ``spec.Options``). The result is a typed ``AuditResult``. The CLI, the service
and the reference runs call the same ``run_audit`` underneath, so the report is the same.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from pydantic import BaseModel

from .audit import run_audit
from .errors import ProbeError
from .groups import Group, GroupLike, group_spec_of, resolve_group
from .inputs import AuditRequest
from .progress import ProgressFn
from .result import AuditResult
from .runtime.loader import resolve_device
from .runtime.module_runner import ModuleRunner
from .spec import parse_audit_spec

ModelLike = "torch.nn.Module | str | os.PathLike | bytes"
ArrayLike = "torch.Tensor | np.ndarray"


def audit(
    model: Any,
    group: GroupLike = "C4",
    probes: Any = None,
    labels: Any = None,
    *,
    shifts: list | None = None,
    policy: dict | None = None,
    require: list[str] | None = None,
    require_confident: bool = False,
    second_probes: Any = None,
    input_shape: tuple[int, ...] | None = None,
    progress: ProgressFn | None = None,
    **options: Any,
) -> AuditResult:
    """Audit ``model``'s invariance to ``group`` on ``probes``; see the module docstring.

    ``require`` / ``require_confident`` set the gate (``spec.AuditSpec``: a borderline verdict fails the
    confident one). ``input_shape`` (per sample) is needed for an ``nn.Module`` audited without probes. Raises
    ``AuditError`` subclasses naming the field for anything the caller can fix.
    """
    spec = parse_audit_spec(
        _spec_dict(group, shifts, policy, require, options) | ({"require_confident": True} if require_confident else {})
    )
    x = _array(probes, "probes")
    y = _array(labels, "labels", floating=False)
    second = _array(second_probes, "second_probes")
    if isinstance(group, Group):  # a built group must act on the samples it is given
        known = tuple(input_shape) if input_shape is not None else (tuple(x.shape[1:]) if x is not None else None)
        resolve_group(group, known)

    def audited(target: Any) -> dict:
        request = AuditRequest(target, spec, probes=x, labels=y, second_probes=second)
        return run_audit(request, progress=progress)

    if isinstance(model, torch.nn.Module):
        shape = tuple(input_shape) if input_shape is not None else (tuple(x.shape[1:]) if x is not None else None)
        if shape is None:
            raise ProbeError(
                "Expected probes or input_shape to know what an nn.Module takes, but got neither", field="input_shape"
            )
        with _eval_mode(model):
            report = audited(ModuleRunner(model, shape, resolve_device(spec.options.device)))
    elif isinstance(model, (bytes, bytearray, memoryview)):
        with tempfile.TemporaryDirectory(prefix="audit-") as tmp:
            path = Path(tmp) / "model"
            path.write_bytes(bytes(model))
            report = audited(path)
    else:
        report = audited(Path(os.fspath(model)))
    return AuditResult.from_report(report)


def _spec_dict(
    group: GroupLike, shifts: list | None, policy: dict | None, require: list[str] | None, options: dict
) -> dict:
    spec: dict[str, Any] = {"group": group_spec_of(group)}
    if shifts is not None:
        spec["shifts"] = [s.model_dump(mode="json") if isinstance(s, BaseModel) else s for s in shifts]
    if policy is not None:
        spec["policy"] = policy
    if require is not None:
        spec["require"] = list(require)
    if options:
        spec["options"] = dict(options)
    return spec


def _array(value: Any, field: str, floating: bool = True) -> np.ndarray | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.float().numpy() if floating and value.is_floating_point() else value.numpy()
    arr = np.asarray(value)
    if floating and np.issubdtype(arr.dtype, np.floating) and arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    return arr


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the audit (dropout, batch-norm statistics), the caller's mode restored after."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.train(training)
