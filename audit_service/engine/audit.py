"""The library's front door: ``run_audit`` turns an ``AuditRequest`` (model, spec, probes) into a report dict.

request -> checked inputs (``inputs``) -> plan (``plan``) -> orbit sweep (``schedule``, ``sweep``) -> Jacobian ->
report (``report.assemble``, the verdict inside) -> the symmetrized model's numbers where the verdict is not genuine.
Everything the client can fix raises an ``AuditError`` subclass naming the field.
"""

from __future__ import annotations

import time
from typing import Callable

from .guard import guarded
from .inputs import AuditRequest, CheckedInputs, check_inputs
from .plan import plan_audit
from .progress import ProgressFn, no_progress
from .report.assemble import Timing, assemble_report, sensitivity_section
from .runtime.layout import LayoutChoice, choose_layout, restore
from .schedule import audit_conditions, run_sweep
from .spec import REPORT_KEYS, AuditSpec
from .sweep import OrbitSweep
from .symmetrization import symmetrized_summary

#: probes the memory-layout check runs (``runtime.layout``)
LAYOUT_SAMPLE = 8

__all__ = ["run_audit", "precheck_audit", "AuditRequest", "REPORT_KEYS"]


def run_audit(request: AuditRequest, progress: ProgressFn | None = None) -> dict:
    """Audit one model; return the JSON-ready report (keys: ``spec.REPORT_KEYS``).

    Raises ``AuditError`` subclasses (``ModelError``, ``SpecError``, ``ProbeError``, ``ModelRuntimeError``) for
    anything the client can fix."""
    progress = progress or no_progress
    spec = request.spec
    started = time.perf_counter()
    progress(0.0, "loading model")
    inputs = check_inputs(request, spec.options.device)
    loaded = time.perf_counter()
    module = inputs.runner.torch_module()
    layout = choose_layout(module, inputs.runner.input_shape, spec.options.memory_format, inputs.sample(LAYOUT_SAMPLE))
    try:
        report = _audit(inputs, spec, layout, progress, started, loaded)
    finally:
        restore(module, layout)  # an in-memory module goes back to its caller as it came
    progress(1.0, "done")
    return report


def precheck_audit(request: AuditRequest) -> dict:
    """Everything ``run_audit`` checks before it sweeps, and nothing more: the model loads (on the CPU), the
    probes and labels fit it, the group fits its input shape (axes, sizes, closure and product orders under
    the caps), the shifts apply. The service runs it at submission (an ``engine`` in the sandbox) so that a
    spec that cannot fit the model is a 422 naming the field, never a job that fails later. Returns
    ``format``, ``input_shape``, ``num_classes`` and ``group_order``."""
    checked = check_inputs(request, "cpu", read_outputs=False)
    runner = checked.runner
    return {
        "format": str(getattr(runner, "format", "") or "") or None,
        "input_shape": [int(d) for d in runner.input_shape],
        "num_classes": runner.num_classes,
        "group_order": len(checked.group.element_names),
    }


def _audit(
    inputs: CheckedInputs, spec: AuditSpec, layout: LayoutChoice, progress: ProgressFn, started: float, loaded: float
) -> dict:
    """The plan, the sweep, the Jacobian and the report of one loaded model."""
    plan = plan_audit(spec, inputs)
    sweep = OrbitSweep(inputs, plan, spec.options)
    conditions = audit_conditions(inputs.shifts, has_probes=inputs.x is not None)
    ticks = _Ticks(progress, sum(sweep.n_chunks(c) for c in conditions) + 1)
    outcome = run_sweep(sweep, conditions, spec, ticks.condition)

    ticks.stage("sensitivity")
    t_sens = time.perf_counter()
    sensitivity = guarded(lambda: sensitivity_section(inputs, spec.options, outcome.stopped), "computing the Jacobian")
    timing = Timing(started, loaded, time.perf_counter() - t_sens)
    report = assemble_report(spec, inputs, plan, outcome, sensitivity, layout, timing)
    if report["verdict"]["label"] not in ("genuine", "trivial"):  # the fix on offer, and what it keeps
        report["symmetrized"] = guarded(
            lambda: symmetrized_summary(inputs.runner, inputs.group, inputs.x, inputs.y, spec.options.batch_size),
            "measuring the symmetrized model",
        )
    return report


class _Ticks:
    """The sweep's progress: the fraction of chunks done, never 1 before the report is assembled."""

    def __init__(self, progress: ProgressFn, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def stage(self, name: str) -> None:
        self.progress(min(self.done / self.total, 0.99), name)

    def condition(self, name: str) -> Callable[[], None]:
        """Report the condition's start; the callback counts one of its chunks."""

        def on_chunk() -> None:
            self.done += 1
            self.stage(f"condition {name}")

        self.stage(f"condition {name}")
        return on_chunk
