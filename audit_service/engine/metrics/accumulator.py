"""Streaming accumulation of one condition's metrics over probe chunks.

Memory is bounded by the number of probes (two floats per probe and metric, for the spread) and
the class count (running sums for the sample variation); orbit tensors are never kept. Everything
stays on the model's device until the condition is read out, so a GPU sweep never waits on a copy.

Every pair metric is kept per probe twice: averaged over the whole group, identity included (the paper's
eqs. 1-3, ``values(name)``), and over the non-identity elements g != e (``values(name, identity=False)``),
which the verdict uses: with the identity in, an agreement of 0.8 on ``flip`` is 0.6 on the flip itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from . import functional as F
from ..names import PER_PROBE_METRICS as _REPORTED

#: the report's per-probe metrics (``engine.names``) and the squared logit distance behind LI_normalized
PER_PROBE_METRICS = (*(str(m) for m in _REPORTED), "sq_dist")


@dataclass
class ConditionAccumulator:
    """Collects per-probe means over the orbit, and running logit moments for the sample variation."""

    num_classes: int
    per_probe: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {k: [] for k in PER_PROBE_METRICS})
    #: the same per-probe means over the non-identity elements g != e only (element 0 left out)
    per_probe_non_identity: dict[str, list[torch.Tensor]] = field(
        default_factory=lambda: {k: [] for k in PER_PROBE_METRICS}
    )
    n: int = 0
    #: running moments of the logits centred over classes (what softmax and argmax see), for ``relative_spread``
    _sum_c: torch.Tensor | None = None
    _sumsq_c: torch.Tensor | None = None
    _sum: torch.Tensor | None = None
    _sumsq: torch.Tensor | None = None
    _sq_norm: torch.Tensor | float = 0.0
    si_pairs_total: int = 0
    _si_undefined: torch.Tensor | int = 0
    #: predicted-class counts at x, over the orbit g x (identity included), and label counts
    _pred_x: torch.Tensor | None = None
    _pred_gx: torch.Tensor | None = None
    _pred_gx_non_identity: torch.Tensor | None = None
    _labels: torch.Tensor | None = None
    #: per group element: sums over probes (and counts, for SI's undefined pairs) of each pair metric
    _elem_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    _elem_count: dict[str, torch.Tensor] = field(default_factory=dict)

    def update(
        self,
        logits_gx: torch.Tensor,
        labels: torch.Tensor | None = None,
        si_pairs: torch.Tensor | None = None,
    ) -> None:
        """Add one chunk: ``logits_gx`` (G, n, C) with the identity first; ``si_pairs`` (G, n) or None."""
        logits_x = logits_gx[0]
        self._add("DI", F.distribution_invariance_error(logits_x, logits_gx))
        self._add("LI", F.logit_invariance_error(logits_x, logits_gx))
        self._add("sq_dist", F.squared_logit_distance(logits_x, logits_gx))
        self._add("agreement", F.prediction_agreement(logits_x, logits_gx))
        if labels is not None:
            self._add("accuracy", F.orbit_accuracy(logits_gx, labels))
        if si_pairs is not None:
            self.update_saliency(si_pairs)
        self._count_predictions(logits_x, logits_gx, labels)
        x64 = logits_x.double()
        s, ss = x64.sum(0), x64.pow(2).sum(0)
        self._sum = s if self._sum is None else self._sum + s
        self._sumsq = ss if self._sumsq is None else self._sumsq + ss
        self._sq_norm = self._sq_norm + x64.pow(2).sum()
        centred = x64 - x64.mean(dim=-1, keepdim=True)
        s, ss = centred.sum(0), centred.pow(2).sum(0)
        self._sum_c = s if self._sum_c is None else self._sum_c + s
        self._sumsq_c = ss if self._sumsq_c is None else self._sumsq_c + ss
        self.n += logits_x.shape[0]

    def update_saliency(self, si_pairs: torch.Tensor) -> None:
        """Add one chunk's SI pairs (G, n) alone: the saliency pass that follows a forward-only pass
        over the same chunks, in the same order (``OrbitSweep.add_saliency``)."""
        self.si_pairs_total += si_pairs.numel()
        self._si_undefined = self._si_undefined + torch.isnan(si_pairs).sum()
        self._add("SI", si_pairs, nan_aware=True)

    def _count_predictions(self, logits_x: torch.Tensor, logits_gx: torch.Tensor, labels: torch.Tensor | None) -> None:
        c = self.num_classes
        at_x = torch.bincount(logits_x.argmax(dim=-1).flatten(), minlength=c)[:c]
        on_orbit = torch.bincount(logits_gx.argmax(dim=-1).flatten(), minlength=c)[:c]
        # without the identity (element 0); a one-element group has no other element: the orbit is x itself
        others = logits_gx[1:] if logits_gx.shape[0] > 1 else logits_gx
        off_identity = torch.bincount(others.argmax(dim=-1).flatten(), minlength=c)[:c]
        self._pred_x = at_x if self._pred_x is None else self._pred_x + at_x
        self._pred_gx = on_orbit if self._pred_gx is None else self._pred_gx + on_orbit
        self._pred_gx_non_identity = (
            off_identity if self._pred_gx_non_identity is None else self._pred_gx_non_identity + off_identity
        )
        if labels is not None:
            counted = torch.bincount(labels.to(logits_x.device).flatten(), minlength=c)[:c]
            self._labels = counted if self._labels is None else self._labels + counted

    def prediction_summary(self) -> dict:
        """Predicted-class frequencies and the chance levels they imply (``functional.chance_agreement``).

        ``classes_predicted``: distinct classes predicted over the probes and their orbits (1: the
        decision ignores the input); ``agreement_chance``: the agreement two independent draws from the
        predicted-class frequencies at x and on the orbit would reach (identity included, like the paper's
        agreement); ``agreement_chance_non_identity``: the same against the predictions on g x, g != e only
        (the chance level of the verdict's agreement); ``accuracy_chance``: the orbit accuracy of always
        guessing the most frequent label (None without labels).
        """
        if self._pred_x is None:
            return {
                "classes_predicted": None,
                "majority_class": None,
                "majority_fraction": None,
                "agreement_chance": None,
                "agreement_chance_non_identity": None,
                "accuracy_chance": None,
            }
        assert self._pred_gx is not None and self._pred_gx_non_identity is not None  # filled with _pred_x
        at_x, on_orbit = self._pred_x.double(), self._pred_gx.double()
        both = on_orbit  # the orbit includes the identity, so the probes' own predictions too
        majority = int(both.argmax())
        labels = self._labels.double() if self._labels is not None else None
        return {
            "classes_predicted": int((both > 0).sum()),
            "majority_class": majority,
            "majority_fraction": float(both[majority] / both.sum()),
            "agreement_chance": F.chance_agreement(at_x, on_orbit),
            "agreement_chance_non_identity": F.chance_agreement(at_x, self._pred_gx_non_identity.double()),
            "accuracy_chance": float(labels.max() / labels.sum()) if labels is not None and labels.sum() > 0 else None,
        }

    def _add(self, name: str, pairs: torch.Tensor, nan_aware: bool = False) -> None:
        values = pairs.double()
        defined = ~torch.isnan(values)
        sums, counts = torch.where(defined, values, 0.0).sum(dim=1), defined.sum(dim=1)
        if name in self._elem_sum:
            self._elem_sum[name] = self._elem_sum[name] + sums
            self._elem_count[name] = self._elem_count[name] + counts
        else:
            self._elem_sum[name], self._elem_count[name] = sums, counts
        mean = torch.nanmean if nan_aware else torch.mean
        self.per_probe[name].append(mean(values, dim=0))
        others = values[1:] if values.shape[0] > 1 else values  # a one-element group: the identity alone
        self.per_probe_non_identity[name].append(mean(others, dim=0))

    def element_means(self, name: str) -> np.ndarray:
        """Mean of one pair metric per group element (G,), over the probes where it is defined."""
        if name not in self._elem_sum:
            return np.empty(0)
        counts = self._elem_count[name].double()
        means = self._elem_sum[name] / counts.clamp_min(1)
        means[counts == 0] = float("nan")
        return means.cpu().numpy()

    def values(self, name: str, identity: bool = True) -> np.ndarray:
        """Per-probe values of one metric (host numpy; one copy per condition and metric): the mean over every
        group element (``identity=True``, the paper's), or over g != e only (``identity=False``, the verdict's)."""
        chunks = (self.per_probe if identity else self.per_probe_non_identity)[name]
        return torch.cat(chunks).cpu().numpy() if chunks else np.empty(0)

    @property
    def si_pairs_undefined(self) -> int:
        """(x, g) pairs whose saliency cosine is undefined (an all-zero map)."""
        return int(self._si_undefined)

    @property
    def sample_variation(self) -> float:
        """E_{x,x'} ||f(x) - f(x')||^2 (see ``functional.sample_variation``), from running moments."""
        return self._variation(self._sum, self._sumsq)

    @property
    def centred_sample_variation(self) -> float:
        """E_{x,x'} ||c(x) - c(x')||^2 of the logits centred over classes, c = f - mean_k f_k: the part of the
        variation softmax and argmax see (a common shift of every logit changes neither)."""
        return self._variation(self._sum_c, self._sumsq_c)

    def _variation(self, total: torch.Tensor | None, total_sq: torch.Tensor | None) -> float:
        """E_{x,x'} ||v(x) - v(x')||^2 = 2 sum_k Var(v_k), from the running sums of v and v^2 over the probes."""
        if self.n == 0 or total is None or total_sq is None:
            return float("nan")
        mean = total / self.n
        var = (total_sq / self.n - mean.pow(2)).clamp_min(0.0)
        return float(2.0 * var.sum())

    @property
    def relative_spread(self) -> float:
        """sqrt( centred sample variation / (2 E_x ||f(x)||^2) ): the spread across probes of what decides the
        prediction, relative to the logits' own size. Scale-free (f and 1e-12 f give the same value), in [0, 1];
        float32 rounding alone gives about 1e-7 (one unit in the last place), a constant model 0."""
        scale = self.mean_squared_norm
        if not np.isfinite(scale):
            return float("nan")
        return math.sqrt(self.centred_sample_variation / (2.0 * scale)) if scale > 0 else 0.0

    @property
    def mean_squared_norm(self) -> float:
        """E_x ||f(x)||^2: the logit scale that ``relative_variation`` is measured against."""
        return float(self._sq_norm) / self.n if self.n else float("nan")

    @property
    def relative_variation(self) -> float:
        """Sample variation over logit scale: ~0 means the model ignores its input (``trivial``)."""
        scale = self.mean_squared_norm
        if not np.isfinite(scale):
            return float("nan")
        return self.sample_variation / scale if scale > 0 else 0.0
