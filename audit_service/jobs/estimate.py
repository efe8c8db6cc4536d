"""Cost before work: what an audit will spend, from its group order, probes and conditions and the model's
measured time a sample, so that the submission check refuses an audit that cannot finish within its
``timeout_s`` (a 422 naming the field to change, with the estimate) and the CLI says what it is about to spend.

The count follows the sweep (``engine/sweep.py``): every condition sends each of its probes through the
whole swept group, forward-only (clean and every shift over ``n_probes``, noise over ``n_noise_probes``); the
saliency adds ``nodes + 1`` gradient passes a sample (forward and backward through the model's torch twin)
on the conditions ``saliency_scope`` names: ``all``, every probe on ``ig_steps`` nodes; ``decisive`` (clean and
noise), only what sequential SI cannot skip (its first batch, on the fewest Gauss-Legendre nodes). The Jacobian and the bootstrap are
small beside these and are not counted; every streamed chunk of a condition adds ``CHUNK_OVERHEAD_S``.

The model is timed on batches of 1 and 4, forward and (where it has a torch twin) gradient, never more than 4 (a
larger batch is the audit's own work, and may be what a broken model fails on), the fastest of a few runs kept,
each run the smaller of its wall-clock time and the CPU time of the process that ran the model (the service's
cage, or this one): a crowded machine stretches the wall clock, many threads the CPU time. Then
``t(b) = overhead + b x marginal``. A call costs ``overhead`` (in the service's cage, a round trip of a few
hundred ms for a gradient on a crowded machine) and a sample ``marginal``; the slope counts only where batch 4
clearly costs more than batch 1 (twice or more), since a step between 1 and 4 (threads, layout) is no slope, and
a sample never costs more than a call of one. The audit's calls are its batches (``batch_size``) in each
chunk. So the estimate leans low: it refuses what cannot finish, never what merely might not. A model without a torch twin (the gradient-free fallback) is counted at
``GRADIENT_COST`` forward passes a gradient sample.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

#: a gradient sample, in forward passes, when the model has no torch twin to time
GRADIENT_COST = 3.0
#: shift, metrics and bookkeeping of one streamed chunk of a condition (seconds, measured on a small CNN)
CHUNK_OVERHEAD_S = 0.02
#: the largest batch the estimate times (the loader's own check batch is small too)
TIMED_BATCH = 4
#: timings of each batch at most (the fastest is kept)
MAX_REPEATS = 16


@dataclass(frozen=True)
class Estimate:
    """An audit's work and its expected wall-clock time on the machine that measured ``sample_s``."""

    group_elements: int
    conditions: int
    forward_samples: int
    gradient_samples: int
    chunks: int
    #: seconds a sample and a call (forward, gradient), from the timed batches
    sample_s: float
    gradient_sample_s: float
    call_s: float
    gradient_call_s: float
    batch: int
    seconds: float
    device: str

    def describe(self) -> str:
        """One line a person reads: the passes, the time a sample, the total."""
        return (f"{self.forward_samples:,} forward passes ({self.group_elements} group elements x "
                f"{self.conditions} conditions x their probes) at {self.sample_s * 1e3:.3g} ms a sample and "
                f"{self.call_s * 1e3:.3g} ms a call, and {self.gradient_samples:,} gradient passes at "
                f"{self.gradient_sample_s * 1e3:.3g} ms a sample and {self.gradient_call_s * 1e3:.3g} ms a call "
                f"(batch {self.batch}, measured on {self.device}): about {format_seconds(self.seconds)}")

    def to_dict(self) -> dict:
        return asdict(self)


def format_seconds(seconds: float) -> str:
    """``42 s``, ``7.5 min``, ``2.1 h``."""
    if seconds < 90:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def count_samples(spec: Any, group_elements: int, n_probes: int, n_shifts: int) -> tuple[int, int, int, int]:
    """(conditions, forward samples, gradient samples, chunks) of an audit over ``n_probes`` client probes
    (0: none) and ``n_shifts`` applicable shifts; ``spec`` is a parsed ``AuditSpec``."""
    options = spec.options
    noise = options.n_noise_probes
    per_condition = [n_probes] * (1 + n_shifts) if n_probes else []
    per_condition.append(noise)
    forward = group_elements * sum(per_condition)
    scope = options.saliency_scope if options.saliency else "none"
    if scope == "all":
        with_saliency, nodes = sum(per_condition), options.ig_steps
    elif scope == "decisive":
        # sequential SI (engine/plan.py) may stop after its first batch, and IG may settle on the fewest
        # Gauss-Legendre nodes: the estimate counts that much, so it never refuses an audit that could finish
        from ..engine.metrics.saliency import STEP_LADDER
        from ..engine.plan import SI_LOOKS, SI_MIN_BATCH

        def first_batch(cap: int) -> int:
            return max(1, min(cap, max(SI_MIN_BATCH, math.ceil(cap / SI_LOOKS))))

        with_saliency = first_batch(noise) + (first_batch(n_probes) if n_probes else 0)
        nodes = min(STEP_LADDER[0], options.ig_steps)
    else:
        with_saliency, nodes = 0, 0
    gradient = group_elements * with_saliency * (nodes + 1)
    chunks = sum(-(-n // options.probe_chunk) for n in per_condition)
    return len(per_condition), forward, gradient, chunks


def time_calls(run: Callable[[Any], Any], runner: Any, budget_s: float = 1.0) -> tuple[float, float]:
    """(seconds a call, seconds a sample) of ``run(x)``: batches of 1 and 4 timed in turn after a warm-up, at
    least twice and at most ``MAX_REPEATS`` times each while ``budget_s`` lasts, the fastest of each kept (a
    shared machine only ever adds time); the slope only where batch 4 costs twice batch 1 or more."""
    import torch

    inputs = {b: torch.zeros((b, *runner.input_shape), dtype=torch.float32, device=runner.device)
              for b in (1, TIMED_BATCH)}

    pid = getattr(getattr(runner, "cage", None), "pid", None) or os.getpid()

    def timed(b: int) -> float:
        cpu, start = cpu_seconds(pid), time.perf_counter()
        run(inputs[b])
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        wall = time.perf_counter() - start
        used = cpu_seconds(pid) - cpu if cpu is not None else None
        # on a GPU the CPU waits: only the wall clock says how long a call takes there
        return wall if used is None or used <= 0 or runner.device.type == "cuda" else min(wall, used)

    for b in inputs:  # warm-up: first calls pay for allocation, layout and kernel choice
        timed(b)
    best = {b: math.inf for b in inputs}
    deadline = time.perf_counter() + budget_s
    for i in range(MAX_REPEATS):
        if i >= 2 and time.perf_counter() > deadline:
            break
        for b in inputs:
            best[b] = min(best[b], timed(b))
    one, four = best[1], best[TIMED_BATCH]
    if four < 2 * one:  # no slope to read: the call's own cost dominates
        return four, 0.0
    marginal = min((four - one) / (TIMED_BATCH - 1), one)
    return max(0.0, one - marginal), marginal


def cpu_seconds(pid: int) -> float | None:
    """CPU time of process ``pid``, all its threads (``/proc/PID/task/*/schedstat``, in ns); None where
    there is no such file to read."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):  # a thread that ended meanwhile
                continue
    except OSError:
        return None
    return total / 1e9


def _gradient(module: Any) -> Callable[[Any], Any]:
    import torch

    def run(x: Any) -> Any:
        x = x.clone().requires_grad_(True)
        return torch.autograd.grad(module(x).sum(), x)[0]

    return run


def estimate(spec: Any, runner: Any, n_probes: int, n_shifts: int, group_elements: int) -> Estimate:
    """Time the model and count the audit's passes (``count_samples``)."""
    options = spec.options
    conditions, forward, gradient, chunks = count_samples(spec, group_elements, n_probes, n_shifts)
    batch = max(1, min(options.batch_size, group_elements * options.probe_chunk))
    call_s, sample_s = time_calls(lambda x: runner.logits(x, batch), runner)
    module = runner.torch_module() if gradient else None
    gradient_call_s, gradient_s = (time_calls(_gradient(module), runner) if module is not None
                                   else (call_s, GRADIENT_COST * sample_s))
    # the calls: a chunk's batches, at least one a chunk (forward), one a chunk and IG step batch (gradient)
    calls = max(chunks, math.ceil(forward / batch))
    gradient_calls = math.ceil(gradient / batch)
    seconds = (forward * sample_s + calls * call_s + gradient * gradient_s + gradient_calls * gradient_call_s
               + chunks * CHUNK_OVERHEAD_S)
    return Estimate(group_elements=group_elements, conditions=conditions, forward_samples=forward,
                    gradient_samples=gradient, chunks=chunks, sample_s=sample_s, gradient_sample_s=gradient_s,
                    call_s=call_s, gradient_call_s=gradient_call_s, batch=batch, seconds=seconds,
                    device=str(runner.device))


def estimating_loader(load: Callable[..., Any], spec: Any, probes: Any, on_estimate: Callable[[Estimate], None]
                      ) -> Callable[..., Any]:
    """``load`` (``load_model``'s signature) that, once the model is loaded, estimates the audit and hands the
    estimate to ``on_estimate`` before the audit goes on. A spec that does not fit the model gets no estimate:
    the audit's own checks then say what is wrong."""
    from ..engine.errors import AuditError
    from ..engine.groups import build_group
    from ..engine.shifts import applicable_default_shifts
    from ..engine.spec import default_shifts

    def load_and_estimate(*args: Any, **kwargs: Any) -> Any:
        runner = load(*args, **kwargs)
        try:
            group = build_group(spec.group, runner.input_shape)
            n_probes = min(spec.options.n_probes, len(probes)) if probes is not None else 0
            shifts = (applicable_default_shifts(default_shifts(), runner.input_shape)[0] if spec.shifts is None
                      else spec.shifts)
            found = estimate(spec, runner, n_probes, len(shifts), len(group.element_names))
        except AuditError:
            return runner
        on_estimate(found)
        return runner

    return load_and_estimate


def precheck_with_estimate(request: Any, progress: Any = None) -> dict:
    """The submission check's engine (``audit.precheck_audit``, run in the sandbox) plus the audit's estimate
    under ``estimate`` (``Estimate.to_dict``), measured on the sandbox's CPU. ``request``: the sandbox's
    ``engine.inputs.AuditRequest``."""
    from ..engine.audit import precheck_audit

    found: list[Estimate] = []
    loader = estimating_loader(request.load, request.spec, request.probes, found.append)
    facts = precheck_audit(replace(request, load=loader))
    return {**facts, **({"estimate": found[0].to_dict()} if found else {})}


def refusal(spec: dict, model_entry: dict, timeout_s: float, max_timeout_s: float) -> tuple[str, str] | None:
    """(message, field) when the audit's estimate (``model_entry["estimate"]``, taken out of the entry: it is
    not stored with the job) says it cannot finish within ``timeout_s``, else None. The field is the one to
    change: ``timeout_s`` while the service's cap (``max_timeout_s``) leaves room, else the group or the
    probes. An audit on ``cuda`` is never refused: the check measured the CPU."""
    found = model_entry.pop("estimate", None)
    if not isinstance(found, dict) or ((spec.get("options") or {}).get("device") == "cuda"):
        return None
    est = Estimate(**found)
    if est.seconds <= timeout_s:
        return None
    options = spec.get("options") or {}
    fits = max(1, math.floor(timeout_s / est.seconds * est.group_elements))
    fewer = (f"a group of at most about {fits} elements (`spec.group`), fewer probes (`spec.options.n_probes`, "
             f"now {options.get('n_probes')}) or shifts (`spec.shifts`), or `spec.options.saliency_scope` none")
    if est.seconds <= max_timeout_s:
        return (f"Expected an audit that can finish within timeout_s={timeout_s:g} s, but the estimate is "
                f"{est.describe()}; raise `timeout_s` to at least {min(math.ceil(est.seconds * 1.5), int(max_timeout_s))} (the service "
                f"allows up to {max_timeout_s:g} s), or ask for {fewer}", "timeout_s")
    return (f"Expected an audit that can finish within the service's limit of {max_timeout_s:g} s "
            f"(AUDIT_JOB_TIMEOUT_S; timeout_s={timeout_s:g}), but the estimate is {est.describe()}; ask for "
            f"{fewer}", "spec.group")
