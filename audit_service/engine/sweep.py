"""The orbit sweep: stream probe chunks through (shift ->) whole group orbit -> model -> metrics.

Each chunk of ``n`` probes becomes one (G * n) batch for the logits and, for the saliency, one
(G * n) batch of integrated gradients, all on the model's device. A condition can be swept
forward-only first (one pass a sample) and get its saliency later (``add_saliency``, ``ig_steps + 1``
passes a sample), over the same seeded chunks: the audit decides in between where SI is worth it. Only per-probe scalars and a
few example maps are kept, so memory is bounded by the chunk size, not the probe count.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .inputs import CheckedInputs
from .metrics import ConditionAccumulator, saliency_similarity
from .metrics.functional import logit_invariance_error
from .metrics.saliency import postprocess
from .plan import AuditPlan
from .schema import SaliencySampling
from .sequential import Stopped
from .shifts import apply_shift, uniform_noise
from .spec import Options, ShiftSpec

#: samples of each saliency batch on which IG's completeness error is measured (one extra forward pass of them)
COMPLETENESS_SAMPLES = 32
#: Worst-similarity pairs kept per condition for the report's saliency examples (``report.examples``).
EXAMPLES_PER_CONDITION = 3


@dataclass(frozen=True)
class Condition:
    """One row of the report: the clean probes, a shift of them, or pure uniform noise."""

    name: str
    shift: ShiftSpec | None = None
    noise: bool = False
    #: keep the worst-similarity saliency maps for the report (the clean and noise conditions)
    keep_examples: bool = False


@dataclass
class ConditionResult:
    condition: Condition
    accumulator: ConditionAccumulator
    #: the lowest-similarity (element, probe) pairs, maps still tensors (``report.examples`` renders them)
    worst: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    #: whether SI was computed on this condition (``run(saliency=...)``, ``add_saliency``)
    saliency_computed: bool = False
    #: the part of ``seconds`` spent on the saliency pass (integrated gradients and their logits)
    saliency_seconds: float = 0.0
    #: probes whose SI was computed (fewer than ``accumulator.n`` when the sequential bound stopped early)
    saliency_probes: int = 0
    #: why the saliency pass stopped: decided | not_needed | cap (None while SI is not computed)
    saliency_stopped: Stopped | None = None
    #: IG's completeness: (sum |sum attr - (f(x) - f(0))|, sum |f(x) - f(0)|) over the samples checked
    completeness: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class SweepOutcome:
    """What the sweep ran (``schedule.run_sweep``): the results in report order, where SI was computed and why
    not elsewhere, how each SI pass was sampled, and what early stopping skipped (``stopped``: why)."""

    scope: str
    results: list[ConditionResult]
    saliency_reasons: dict[str, str]
    sampling: dict[str, SaliencySampling]
    scope_reason: str | None
    stopped: str | None
    skipped: list[dict]


class OrbitSweep:
    """Runs conditions for one (model, group) pair; see the module docstring for the data flow."""

    def __init__(self, inputs: CheckedInputs, plan: AuditPlan, options: Options) -> None:
        self.runner = inputs.runner
        self.group = inputs.group
        self.options = options
        self.stats = inputs.stats
        self.plan = plan
        self.saliency = plan.saliency
        self.device = inputs.runner.device
        self.probes, self.labels = inputs.x, inputs.y
        self.second_probes = inputs.second.to(self.device) if inputs.second is not None else None

    # ------------------------------------------------------------------ public
    def n_chunks(self, condition: Condition) -> int:
        """How many chunks ``run`` sweeps the condition in (the progress counts them)."""
        n = self.options.n_noise_probes if condition.noise else (self.probes.shape[0] if self.probes is not None else 0)
        return -(-n // self.options.probe_chunk)

    def run(
        self, condition: Condition, on_chunk: Callable[[], None] = lambda: None, saliency: bool = True
    ) -> ConditionResult:
        """Sweep one condition. The probes and labels may live on the host; chunks move to the device.

        ``saliency=False`` is the forward-only pass (one model pass a sample); ``add_saliency`` can add
        SI to its result later, over the very same chunks."""
        start = time.perf_counter()
        acc = ConditionAccumulator(self.runner.num_classes)
        worst: list[dict] = []
        with_si = saliency and self.saliency is not None
        completeness = (0.0, 0.0)
        for x, y in self._chunks(condition):
            logits_gx, si_pairs, maps, seen = self._orbit_batch(x, y, with_si)
            assert logits_gx is not None  # the forward pass always returns the orbit's logits
            acc.update(logits_gx, y, si_pairs)
            if si_pairs is not None and maps is not None:
                completeness = _summed(completeness, seen.get("completeness", (0.0, 0.0)))
                if condition.keep_examples:
                    worst = keep_worst(worst, si_pairs, maps, acc.n - x.shape[0], logits_gx, seen)
            on_chunk()
        self._sync()
        seconds = time.perf_counter() - start
        return ConditionResult(
            condition,
            acc,
            worst,
            seconds,
            saliency_computed=with_si,
            saliency_seconds=seconds if with_si else 0.0,
            saliency_probes=acc.n if with_si else 0,
            saliency_stopped="cap" if with_si else None,
            completeness=completeness,
        )

    def add_saliency(
        self,
        result: ConditionResult,
        on_chunk: Callable[[], None] = lambda: None,
        batch: int | None = None,
        should_stop: Callable[[ConditionResult], Stopped | None] = lambda result: None,
    ) -> None:
        """SI for a condition that ``run`` swept forward-only: the same seeded chunks again, their
        logits (for the IG target) and integrated gradients; only SI is added to the accumulator.

        Sequential SI: the probes go through in batches of ``batch`` (the chunks split further), and after each
        ``should_stop(result)`` may end the pass with its reason (``decided``, ``not_needed``); a pass that runs
        through every probe ends with ``cap``. The batches are the leading probes of the same seeded chunks, so
        the probes SI used are the first ``saliency_probes`` of the forward pass."""
        if result.saliency_computed or self.saliency is None:
            return
        start = time.perf_counter()
        condition, acc = result.condition, result.accumulator
        worst: list[dict] = []
        offset = 0
        completeness = (0.0, 0.0)
        stopped: Stopped | None = None
        result.saliency_computed = True
        size = batch or max(acc.n, 1)
        look = size  # the bound is read each time ``size`` more probes are in, whatever the chunking
        for chunk, labels_chunk in self._chunks(condition):
            first = 0
            while first < chunk.shape[0]:
                take = min(chunk.shape[0] - first, look - offset)
                x = chunk[first : first + take]
                y = None if labels_chunk is None else labels_chunk[first : first + take]
                logits_gx, si_pairs, maps, seen = self._orbit_batch(x, y, True, orbit_logits=condition.keep_examples)
                assert si_pairs is not None and maps is not None  # a saliency pass with a saliency method
                acc.update_saliency(si_pairs)
                completeness = _summed(completeness, seen.get("completeness", (0.0, 0.0)))
                if condition.keep_examples:
                    worst = keep_worst(worst, si_pairs, maps, offset, logits_gx, seen)
                offset += take
                first += take
                result.saliency_probes = offset
                if offset >= look or offset >= acc.n:
                    look += size
                    stopped = should_stop(result)
                    if stopped:
                        break
            on_chunk()
            if stopped:
                break
        self._sync()
        result.worst = worst
        result.saliency_stopped = stopped or "cap"
        result.completeness = completeness
        result.saliency_seconds = time.perf_counter() - start
        result.seconds += result.saliency_seconds

    # ------------------------------------------------------------------ internals
    def _chunks(self, condition: Condition) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """The condition's probes (and labels, but never on noise) in chunks on the device, from the condition's
        own seeded generator: a second pass over a condition draws the same chunks."""
        size, generator = self.options.probe_chunk, self._generator(condition)
        probes, labels = self.probes, (self.labels if not condition.noise else None)
        if condition.noise:
            total = self.options.n_noise_probes
            for start in range(0, total, size):
                n = min(size, total - start)
                yield uniform_noise(n, self.runner.input_shape, self.stats, generator, self.device), None
            return
        assert probes is not None
        for start in range(0, probes.shape[0], size):
            x = probes[start : start + size].to(self.device, non_blocking=True)
            if condition.shift is not None:
                x = apply_shift(x, condition.shift, self.stats, generator, self.second_probes)
            y = None if labels is None else labels[start : start + size].to(self.device, non_blocking=True)
            yield x, y

    def _generator(self, condition: Condition) -> torch.Generator:
        """The condition's own seeded generator: a second pass over a condition draws the same chunks."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.options.seed * 1_000_003 + zlib.crc32(condition.name.encode()))
        return generator

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _logits(self, flat: torch.Tensor) -> torch.Tensor:
        """Forward-only logits (the runners run them under ``torch.inference_mode``); under bf16 autocast
        where the plan says so (``plan.check_autocast`` compared it with fp32 first)."""
        if self.plan.autocast:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.runner.logits(flat, self.options.batch_size).float()
        return self.runner.logits(flat, self.options.batch_size)

    def _orbit_batch(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None,
        saliency: bool = True,
        orbit_logits: bool = True,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, dict]:
        """Logits (G, n, C), SI per pair (G, n), the aligned saliency maps (G, n, *S) and what the
        report's examples show beside them: the orbit (G, n, *S) and the raw |IG| in each input's frame.

        ``orbit_logits=False`` (a saliency pass after the forward one, keeping no examples): no orbit logits
        (None); the IG target comes from the labels, else from the logits of x alone (1/G of the passes)."""
        n, shape = x.shape[0], x.shape[1:]
        orbit = self.group.orbit(x)  # (G, n, *S)
        g = orbit.shape[0]
        flat = orbit.reshape(g * n, *shape)
        logits = self._logits(flat).reshape(g, n, -1) if orbit_logits or not saliency else None
        if self.saliency is None or not saliency:
            return logits, None, None, {}
        if labels is not None:
            target = labels
        else:
            target = (logits[0] if logits is not None else self._logits(x)).argmax(-1)
        target = target.repeat(g)
        signed = self.saliency.attribute(flat, target)
        seen: dict = {"orbit": orbit}
        if self.saliency.ig is not None:  # IG's completeness on an even sample of the batch
            pick = slice(None, None, max(1, flat.shape[0] // COMPLETENESS_SAMPLES))
            seen["completeness"] = self.saliency.ig.completeness(flat[pick], target[pick], signed[pick])
        attributions = signed.abs().reshape(g, n, *shape)
        seen["raw"] = attributions
        # g^-1 first, then threshold + filter: g^-1 is a permutation, so it commutes with |.| and
        # the 0.9 x max threshold, and aligning before the Gaussian filter keeps the filter's
        # border handling from breaking exact equivariance (cyclic translations, permutations).
        aligned = self.group.inverse_orbit(attributions)
        maps = postprocess(aligned.reshape(g * n, *shape), sample_rank=len(shape)).reshape(g, n, *shape)
        return logits, saliency_similarity(maps[0], maps), maps, seen


def _summed(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """Two completeness sums added (numerator, denominator)."""
    return a[0] + b[0], a[1] + b[1]


def keep_worst(
    kept: list[dict],
    si_pairs: torch.Tensor,
    maps: torch.Tensor,
    offset: int,
    logits: torch.Tensor | None = None,
    seen: dict | None = None,
) -> list[dict]:
    """Merge this chunk's lowest-similarity (element, probe) pairs into ``kept`` (identity excluded);
    ties in similarity (common: many pairs at exactly 1 or undefined) go to the larger logit error LI.

    Maps stay tensors (views of this chunk's maps, cloned); only the few survivors are turned into JSON lists,
    by ``report.examples``.
    """
    if si_pairs.shape[0] < 2:
        return kept
    scores = si_pairs[1:].nan_to_num(nan=-2.0).flatten()  # undefined (zero map) first
    if logits is not None:
        li = logit_invariance_error(logits[0], logits[1:]).double().flatten()  # as the accumulator has it
    else:
        li = torch.zeros_like(scores, dtype=torch.float64)
    by_li = torch.argsort(-li, stable=True)
    order = by_li[torch.argsort(scores[by_li], stable=True)][:EXAMPLES_PER_CONDITION]
    n = si_pairs.shape[1]
    seen = seen or {}
    for idx in order.tolist():
        element, probe = 1 + idx // n, idx % n
        entry = {
            "probe": offset + probe,
            "element": element,
            "score": float(scores[idx]),
            "li": float(li[idx]),
            "map_x": maps[0, probe].clone(),
            "map_gx_aligned": maps[element, probe].clone(),
        }
        if "orbit" in seen:
            entry["image_x"] = seen["orbit"][0, probe].clone()
            entry["image_gx"] = seen["orbit"][element, probe].clone()
        if "raw" in seen:
            entry["raw_x"] = seen["raw"][0, probe].clone()
            entry["raw_gx"] = seen["raw"][element, probe].clone()
        kept.append(entry)
    kept.sort(key=lambda e: (e["score"], -e["li"]))
    return kept[:EXAMPLES_PER_CONDITION]
