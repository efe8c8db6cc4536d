"""Invariance metrics (Moskalev et al. 2023): pure functions, streaming accumulators, saliency, sensitivity."""

from .accumulator import ConditionAccumulator
from .functional import (
    chance_agreement,
    chance_corrected,
    distribution_invariance_error,
    logit_invariance_error,
    orbit_accuracy,
    prediction_agreement,
    saliency_similarity,
    sample_variation,
    squared_logit_distance,
)
from .summary import summarize

__all__ = [
    "ConditionAccumulator",
    "chance_agreement",
    "chance_corrected",
    "distribution_invariance_error",
    "logit_invariance_error",
    "orbit_accuracy",
    "prediction_agreement",
    "saliency_similarity",
    "sample_variation",
    "squared_logit_distance",
    "summarize",
]
