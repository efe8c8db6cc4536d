"""The verdict's models: the label, the gate, every criterion evaluated and the reasons as data
(``engine.verdict.decide`` builds them)."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from ..names import Metric
from ..spec import Policy, VerdictLabel
from .base import ReportModel


class ReportPolicy(Policy):
    """The verdict's policy as the report carries it: ``spec.Policy``'s fields; keys of other policy versions
    are kept (a stored version-2 report still reads)."""

    model_config = ConfigDict(extra="allow", frozen=True)


#: what a reason is about
ReasonTopic = Literal["label", "heading", "genuine_failure", "borderline", "require_confident", "warning"]


class Miss(ReportModel):
    """One condition where a genuine criterion misses, with the value there."""

    condition: str
    value: float | None


class Reason(ReportModel):
    """One reason for the verdict: its sentence (``text``, as in ``reasons``) and what it says as data.

    ``topic``: label (why this label), heading (introduces the genuine failures), genuine_failure (one genuine
    criterion missed: ``criterion``, ``requirement``, ``threshold``, ``misses`` of ``n_conditions``), borderline,
    require_confident, warning. ``headline`` / ``detail``: the sentence's short form and the rest."""

    text: str
    topic: ReasonTopic
    headline: str
    detail: str | None = None
    criterion: str | None = Field(default=None, description="the metric (or quantity) the reason is about")
    condition: str | None = None
    value: float | None = None
    threshold: float | None = None
    requirement: str | None = Field(default=None, description="e.g. '<= 1e-05'")
    misses: list[Miss] = Field(default_factory=list, description="genuine_failure: where the criterion misses")
    n_conditions: int | None = Field(default=None, description="genuine_failure: out of how many conditions")

    def as_dict(self) -> dict:
        """The reason as ``reason_details`` carries it: the fields that say something (defaults left out)."""
        return self.model_dump(mode="json", exclude_defaults=True)


#: why a criterion was evaluated: the genuine criteria, invariant predictions on the clean probes, the learned task
CriterionRole = Literal["genuine", "invariant_predictions", "learned_task"]


class Criterion(ReportModel):
    """One criterion the verdict evaluated on one condition."""

    criterion: Metric = Field(description="LI_normalized, DI, SI, agreement, kappa or accuracy_kappa (g != e)")
    condition: str
    value: float | None
    threshold: float
    kind: Literal["min", "max"]
    role: CriterionRole
    interval: list[float] | None = Field(description="95% interval of the value")
    n_probes: int | None
    passed: bool
    straddles: bool
    probes_to_settle: int | None = Field(
        description="probes at which the interval would stop straddling, at this estimate (null: cannot say)"
    )
    option: Literal["n_probes", "n_noise_probes"] = Field(description="the option that sets those probes")


class Verdict(ReportModel):
    """The label, the gate and why."""

    label: VerdictLabel = Field(
        description=(
            "genuine, learned (invariant predictions and labels that show the task was learned), incidental "
            "(invariant predictions, but the labels are at chance: the architecture's invariance, not learned), "
            "undecided (invariant predictions, no labels: learned vs incidental cannot be told), not_invariant, "
            "trivial; not_genuine when no in-distribution probes were given. Every criterion is over g != e."
        )
    )
    reasons: list[str] = Field(description="the reasons as sentences, in order")
    reason_details: list[Reason] | None = Field(
        default=None, description="the same reasons, structured (one per sentence in `reasons`, same order)"
    )
    flags: list[Literal["low_sensitivity"]] = Field(
        default_factory=list,
        description="warnings that do not change the label: low_sensitivity = logits vary little across inputs",
    )
    criteria: list[Criterion] = Field(
        default_factory=list, description="every criterion evaluated on the way to the label"
    )
    borderline: bool = Field(
        default=False,
        description=(
            "a criterion that decides the label has a 95% interval straddling its threshold (more probes could "
            "change the label); see borderline_criteria"
        ),
    )
    borderline_criteria: list[Criterion] = Field(default_factory=list)
    policy: ReportPolicy
    require: list[VerdictLabel] = Field(default_factory=list)
    require_confident: bool = Field(
        default=False, description="strict gate (spec.require_confident, --strict): a borderline verdict does not pass"
    )
    passed: bool | None = None
