"""A condition's models (the clean probes, a shift at a severity, pure noise): what the verdict reads and the
report carries per condition."""

from __future__ import annotations

from typing import Any, Literal, Sequence

from pydantic import Field

from ..names import METRICS, Metric
from ..spec import ShiftSpec
from .base import ReportModel, statistic

#: what a spread summarizes
_PER_PROBE = "the metric's finite per-probe values"


class Spread(ReportModel):
    """``summarize`` of a metric's per-probe values: the mean and how far it can be trusted."""

    mean: float = statistic("mean", _PER_PROBE)
    p5: float = statistic("p5", _PER_PROBE)
    p50: float = statistic("p50", _PER_PROBE)
    p95: float = statistic("p95", _PER_PROBE)
    se: float | None = Field(default=None, description="standard error of the mean (sample std / sqrt(n))")
    n: int | None = Field(default=None, description="how many finite per-probe values there are")
    ci95: list[float] = Field(description="bootstrap 95% interval of the mean ([mean, mean] without resamples)")


def _metric_field(metric: Metric) -> Any:
    info = METRICS[metric]
    return Field(default=None, description=f"{info.title}: {info.meaning} ({info.better} is better)")


class ConditionMetrics(ReportModel):
    """One condition's metric means (``metrics``: over g != e, what the verdict reads; ``paper_metrics``: the
    paper's identity-inclusive means over all of G). Null where undefined (no labels, zero saliency)."""

    DI: float | None = _metric_field(Metric.DI)
    LI: float | None = _metric_field(Metric.LI)
    SI: float | None = _metric_field(Metric.SI)
    LI_normalized: float | None = _metric_field(Metric.LI_NORMALIZED)
    agreement: float | None = _metric_field(Metric.AGREEMENT)
    accuracy: float | None = _metric_field(Metric.ACCURACY)
    agreement_chance: float | None = _metric_field(Metric.AGREEMENT_CHANCE)
    kappa: float | None = _metric_field(Metric.KAPPA)
    accuracy_chance: float | None = _metric_field(Metric.ACCURACY_CHANCE)
    accuracy_kappa: float | None = _metric_field(Metric.ACCURACY_KAPPA)

    def __getitem__(self, metric: str) -> float | None:
        """``metrics["DI"]``, as the JSON reads; a KeyError names the metrics there are."""
        if metric not in self.model_fields_set:
            raise KeyError(f"no metric {metric!r}; this condition has {sorted(self.model_fields_set)}")
        return getattr(self, metric)

    def __contains__(self, metric: object) -> bool:
        return metric in self.model_fields_set

    def get(self, metric: str, default: float | None = None) -> float | None:
        return getattr(self, metric) if metric in self.model_fields_set else default

    def items(self) -> list[tuple[str, float | None]]:
        return [(k, getattr(self, k)) for k in self.model_fields if k in self.model_fields_set]


class ConditionSpreads(ReportModel):
    """Each spread metric's ``Spread`` (null where the metric has no values)."""

    DI: Spread | None = None
    LI: Spread | None = None
    SI: Spread | None = None
    LI_normalized: Spread | None = None
    agreement: Spread | None = None
    accuracy: Spread | None = None

    def get(self, metric: str) -> Spread | None:
        return getattr(self, metric, None)


class Predictions(ReportModel):
    """The predicted classes over the probes and their orbits."""

    classes_predicted: int
    majority_class: int
    majority_fraction: float


class SampledInterval(ReportModel):
    """A sampled group's 95% normal interval for a group average, over the drawn elements."""

    mean: float
    lo: float
    hi: float
    n_elements: int


class SaliencySampling(ReportModel):
    """How many probes SI was computed on and why it stopped there (absent where SI ran on every probe)."""

    probes_used: int
    probes_cap: int
    interval: list[float] | None = Field(description="[lo, hi] of SI's mean when it stopped; null: none yet")
    confidence: float
    stopped: Literal["decided", "cap", "not_needed"]
    ig_method: str
    ig_steps: int
    completeness_error: float | None


class Condition(ReportModel):
    """One condition (the clean probes, a shift at a severity, pure noise): metrics, spreads, notes."""

    name: str = Field(description="clean, noise, or the shift's label (blur@3, blend(noise)@0.5)")
    shift: ShiftSpec | None
    n_probes: int
    metrics: ConditionMetrics = Field(
        description="means over probes and the non-identity elements g != e (what the verdict reads)"
    )
    spread: ConditionSpreads = Field(default_factory=ConditionSpreads)
    paper_metrics: ConditionMetrics | None = Field(
        default=None, description="the paper's identity-inclusive means over all of G (Moskalev et al. 2023, eqs. 1-3)"
    )
    paper_spread: ConditionSpreads | None = None
    sample_variation: float | None = None
    relative_variation: float | None = None
    relative_spread: float | None = Field(
        default=None,
        description="spread of the class-centred logits across probes over the logits' size (trivial at rounding)",
    )
    saliency_computed: bool = True
    saliency_skipped: str | None = Field(default=None, description="why SI was not computed on this condition")
    notes: list[str] = Field(default_factory=list)
    seconds: float | None = None
    predictions: Predictions | None = None
    saliency_sampling: SaliencySampling | None = None
    group_sample_ci: dict[str, SampledInterval | None] | None = Field(
        default=None, description="sampled groups only: {metric: interval of the group average}"
    )

    def metric(self, metric: str) -> float | None:
        """The mean of ``metric`` over g != e (None where undefined or absent)."""
        return self.metrics.get(metric)


def _metric_property(metric: Metric) -> property:
    return property(
        lambda self: self.metrics.get(metric), doc=f"{METRICS[metric].title} over g != e (``metrics.{metric}``)"
    )


for _metric in Metric:  # condition.LI_normalized, condition.DI, ... : one attribute per row of the table
    setattr(Condition, _metric.value, _metric_property(_metric))


def find_condition(conditions: Sequence[Condition], name: str) -> Condition | None:
    """The condition called ``name`` among ``conditions``, else None."""
    return next((c for c in conditions if c.name == name), None)
