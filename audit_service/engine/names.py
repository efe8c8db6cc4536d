"""The report's metric and condition names, defined once.

``METRICS`` is the one table of a condition's metrics: its name, which direction is good, what it means and
where it shows. Every list of metric names elsewhere (the report's order, the compact summary, the HTML table,
the MLflow tags, the reference profile, the sampled-group intervals) is a view of this table, never a tuple
of its own. ``ConditionName`` holds the two conditions every audit knows by name (the shifts are named by
``ShiftSpec.label``).

It sits at the bottom of the engine (it imports nothing), so that the accumulator, the verdict, the report and
the web tier read it without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


class Metric(StrEnum):
    """A metric of one condition, as the report's ``metrics`` / ``paper_metrics`` name it."""

    DI = "DI"
    LI = "LI"
    SI = "SI"
    LI_NORMALIZED = "LI_normalized"
    AGREEMENT = "agreement"
    ACCURACY = "accuracy"
    AGREEMENT_CHANCE = "agreement_chance"
    KAPPA = "kappa"
    ACCURACY_CHANCE = "accuracy_chance"
    ACCURACY_KAPPA = "accuracy_kappa"


class ConditionName(StrEnum):
    """The conditions every audit names the same way: the client's probes and pure uniform noise."""

    CLEAN = "clean"
    NOISE = "noise"


@dataclass(frozen=True)
class MetricInfo:
    """One metric: its direction, its meaning and which views show it."""

    name: Metric
    better: Literal["low", "high"]
    title: str
    meaning: str
    #: averaged per (probe, g) pair by the accumulator, with a spread (``spread`` / ``paper_spread``)
    per_probe: bool = True
    #: its mean and spread are in ``metrics`` / ``spread``; False: derived from other means (chance levels)
    spread: bool = True
    #: shown in the HTML table, the CLI table and the MLflow tags (display order: ``DISPLAY_ORDER``)
    displayed: bool = True
    #: in the compact summary of ``POST /audit?wait=``
    headline: bool = True
    #: in the scale-free vector that compares a model with the reference runs
    profile: bool = False
    #: measures invariance (accuracy and the chance levels do not)
    invariance: bool = True

    @property
    def kind(self) -> Literal["min", "max"]:
        """A threshold on this metric is a ``max`` (low is good) or a ``min`` (high is good)."""
        return "max" if self.better == "low" else "min"


# a table reads best a row per entry
# fmt: off
_TABLE = (
    MetricInfo(Metric.DI, "low", "predictive-distribution invariance error",
               "KL(softmax f(x) || softmax f(gx)), mean over probes and g; 0 is perfect", profile=True),
    MetricInfo(Metric.LI, "low", "logit invariance error",
               "1/2 ||f(x) - f(gx)||^2, mean over probes and g; 0 is perfect, depends on the logits' scale",
               headline=False),
    MetricInfo(Metric.SI, "high", "saliency invariance similarity",
               "cos(m(x), g^-1 m(gx)) of thresholded |integrated gradients|; 1 is perfect", profile=True),
    MetricInfo(Metric.LI_NORMALIZED, "low", "scale-free logit error",
               "||f(x) - f(gx)||^2 over the logits' sample variation; ~0 invariant, ~1 as much as another input",
               per_probe=False, profile=True),
    MetricInfo(Metric.AGREEMENT, "high", "prediction agreement",
               "P(argmax f(gx) = argmax f(x)); 1 is perfect, compare with agreement_chance", profile=True),
    MetricInfo(Metric.ACCURACY, "high", "orbit accuracy",
               "accuracy over the whole orbit (g = e included) where labels were given", invariance=False),
    MetricInfo(Metric.AGREEMENT_CHANCE, "high", "chance agreement",
               "the agreement two independent draws from the predicted-class frequencies reach",
               per_probe=False, spread=False, displayed=False, headline=False, invariance=False),
    MetricInfo(Metric.KAPPA, "high", "chance-corrected agreement",
               "Cohen's kappa of agreement against agreement_chance; null for a single predicted class",
               per_probe=False, spread=False, displayed=False, headline=False),
    MetricInfo(Metric.ACCURACY_CHANCE, "high", "majority-label rate",
               "the accuracy of always predicting the most frequent label",
               per_probe=False, spread=False, displayed=False, headline=False, invariance=False),
    MetricInfo(Metric.ACCURACY_KAPPA, "high", "chance-corrected accuracy",
               "(accuracy - accuracy_chance) / (1 - accuracy_chance): whether the model learned the task",
               per_probe=False, spread=False, displayed=False, headline=False, invariance=False),
)
# fmt: on

#: the table, by name, in the report's order
METRICS: dict[Metric, MetricInfo] = {m.name: m for m in _TABLE}

#: metrics with a spread, in the report's order (``metrics`` / ``spread`` of a condition)
SPREAD_METRICS: tuple[Metric, ...] = tuple(m.name for m in _TABLE if m.spread)
#: the invariance measures among them (accuracy left out)
INVARIANCE_METRICS: tuple[Metric, ...] = tuple(m for m in SPREAD_METRICS if METRICS[m].invariance)
#: metrics the accumulator averages per probe (the sampled-group intervals estimate these too)
PER_PROBE_METRICS: tuple[Metric, ...] = tuple(m.name for m in _TABLE if m.per_probe)
#: the display order: the scale-free logit error first, as a reader compares models by it
DISPLAY_ORDER: tuple[Metric, ...] = (Metric.LI_NORMALIZED,) + tuple(
    m.name for m in _TABLE if m.displayed and m.name != Metric.LI_NORMALIZED
)
#: the compact summary's metrics, in display order
HEADLINE_METRICS: tuple[Metric, ...] = tuple(m for m in DISPLAY_ORDER if METRICS[m].headline)
#: the reference-profile vector's metrics, in display order
PROFILE_METRICS: tuple[Metric, ...] = tuple(m for m in DISPLAY_ORDER if METRICS[m].profile)
#: the conditions of the reference-profile vector
PROFILE_CONDITIONS: tuple[ConditionName, ...] = (ConditionName.CLEAN, ConditionName.NOISE)


def better(metric: str) -> Literal["low", "high"]:
    """Which direction is good for ``metric``; raises a KeyError naming the known metrics."""
    try:
        return METRICS[Metric(metric)].better
    except ValueError:
        raise KeyError(f"Expected a metric name in {', '.join(METRICS)}, but got {metric!r}") from None
