"""The report as typed models: the JSON contract of ``GET /audits/{id}/report``, the CLI's ``--json`` and
``AuditResult``.

The engine builds the report as a plain dict (``report.build``); ``Report.model_validate(report)`` is its
typed face, and ``Report.to_json()`` gives the same JSON back (key for key: the round-trip tests keep it so).
Every consumer (the HTML page, the compact summary, the CLI table, the MLflow tags, the reference profile)
reads these fields instead of string keys.

Models accept keys they do not know (a newer engine's report still reads, and its keys survive the round
trip); ``parse_report(d, strict=True)`` refuses them, which the tests use so that an unmodelled key fails.
The OpenAPI ``Report`` component is generated from these models (``service.openapi_report``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from ..names import METRICS, ConditionName, Metric
from ..spec import REPORT_KEYS, AuditSpec, GroupSpec, Policy, ShiftSpec, VerdictLabel
from ..verdict import Miss as _Miss
from ..verdict import Reason as _Reason

#: ``model_validate(..., context={STRICT: True})`` refuses keys a model does not declare
STRICT = "forbid_unmodelled_keys"


class ReportModel(BaseModel):
    """Base of the report's models: unknown keys kept (and refused under ``STRICT``), fields by their JSON name."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unmodelled(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and info.context and info.context.get(STRICT):
            known = {f.alias or name for name, f in cls.model_fields.items()} | set(cls.model_fields)
            unknown = sorted(str(k) for k in data if k not in known)
            if unknown:
                raise ValueError(f"{cls.__name__} does not model the key(s) {unknown}: add them to "
                                 f"audit_service/engine/report/model.py (and regenerate the OpenAPI Report)")
        return data

    def to_json(self) -> dict[str, Any]:
        """The JSON dict this model was read from (the keys it was given, none added)."""
        return self.model_dump(mode="json", exclude_unset=True, by_alias=True)

    def __getitem__(self, key: str) -> Any:
        """``section["key"]``, for callers written against the JSON (``result.model["format"]``); a KeyError
        names the keys there are."""
        if key in self.model_fields_set or key in (self.model_extra or {}):
            return getattr(self, key)
        raise KeyError(f"{type(self).__name__} has no key {key!r}; it has {sorted(self.to_json())}")


class ReportPolicy(Policy):
    """The verdict's policy as the report carries it: ``spec.Policy``'s fields; keys of other policy versions
    are kept (a stored version-2 report still reads)."""

    model_config = ConfigDict(extra="allow", frozen=True)


class ReportSpec(AuditSpec):
    """The spec the audit ran, echoed: ``spec.AuditSpec`` with the policy as the report carries it."""

    policy: ReportPolicy = ReportPolicy()


# --------------------------------------------------------------------------- conditions
class Spread(ReportModel):
    """``summarize`` of a metric's per-probe values: the mean and how far it can be trusted."""

    mean: float
    p5: float
    p50: float
    p95: float
    se: float | None = None
    n: int | None = None
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
        description="means over probes and the non-identity elements g != e (what the verdict reads)")
    spread: ConditionSpreads = Field(default_factory=ConditionSpreads)
    paper_metrics: ConditionMetrics | None = Field(
        default=None, description="the paper's identity-inclusive means over all of G (Moskalev et al. 2023, "
                                  "eqs. 1-3)")
    paper_spread: ConditionSpreads | None = None
    sample_variation: float | None = None
    relative_variation: float | None = None
    relative_spread: float | None = Field(
        default=None,
        description="spread of the class-centred logits across probes over the logits' size (trivial at rounding)")
    saliency_computed: bool = True
    saliency_skipped: str | None = Field(default=None, description="why SI was not computed on this condition")
    notes: list[str] = Field(default_factory=list)
    seconds: float | None = None
    predictions: Predictions | None = None
    saliency_sampling: SaliencySampling | None = None
    group_sample_ci: dict[str, SampledInterval | None] | None = Field(
        default=None, description="sampled groups only: {metric: interval of the group average}")

    @property
    def is_clean(self) -> bool:
        return self.name == ConditionName.CLEAN

    def metric(self, metric: str) -> float | None:
        """The mean of ``metric`` over g != e (None where undefined or absent)."""
        return self.metrics.get(metric)


def _metric_property(metric: Metric) -> property:
    return property(lambda self: self.metrics.get(metric),
                    doc=f"{METRICS[metric].title} over g != e (``metrics.{metric}``)")


for _metric in Metric:  # condition.LI_normalized, condition.DI, ... : one attribute per row of the table
    setattr(Condition, _metric.value, _metric_property(_metric))


# --------------------------------------------------------------------------- verdict
class Miss(ReportModel, _Miss):
    """One condition where a genuine criterion misses, with the value there."""


class Reason(ReportModel, _Reason):
    """One reason for the verdict: its sentence (``text``, as in ``reasons``) and what it says as data.

    ``topic``: label (why this label), heading (introduces the genuine failures), genuine_failure (one genuine
    criterion missed: ``criterion``, ``requirement``, ``threshold``, ``misses`` of ``n_conditions``), borderline,
    require_confident, warning. ``headline`` / ``detail``: the sentence's short form and the rest."""

    misses: list[Miss] = Field(  # type: ignore[assignment]  # the same field, its items read strictly
        default_factory=list, description="genuine_failure: where the criterion misses")


class Criterion(ReportModel):
    """One criterion the verdict evaluated on one condition."""

    criterion: Metric = Field(description="LI_normalized, DI, SI, agreement, kappa or accuracy_kappa (g != e)")
    condition: str
    value: float | None
    threshold: float
    kind: Literal["min", "max"]
    role: Literal["genuine", "invariant_predictions", "learned_task"]
    interval: list[float] | None = Field(description="95% interval of the value")
    n_probes: int | None
    passed: bool
    straddles: bool
    probes_to_settle: int | None = Field(
        description="probes at which the interval would stop straddling, at this estimate (null: cannot say)")
    option: Literal["n_probes", "n_noise_probes"] = Field(description="the option that sets those probes")


class Verdict(ReportModel):
    """The label, the gate and why."""

    label: VerdictLabel = Field(description=(
        "genuine, learned (invariant predictions and labels that show the task was learned), incidental "
        "(invariant predictions, but the labels are at chance: the architecture's invariance, not learned), "
        "undecided (invariant predictions, no labels: learned vs incidental cannot be told), not_invariant, "
        "trivial; not_genuine when no in-distribution probes were given. Every criterion is over g != e."))
    reasons: list[str] = Field(description="the reasons as sentences, in order")
    reason_details: list[Reason] | None = Field(
        default=None, description="the same reasons, structured (one per sentence in `reasons`, same order)")
    flags: list[Literal["low_sensitivity"]] = Field(
        default_factory=list,
        description="warnings that do not change the label: low_sensitivity = logits vary little across inputs")
    criteria: list[Criterion] = Field(default_factory=list,
                                      description="every criterion evaluated on the way to the label")
    borderline: bool = Field(default=False, description=(
        "a criterion that decides the label has a 95% interval straddling its threshold (more probes could "
        "change the label); see borderline_criteria"))
    borderline_criteria: list[Criterion] = Field(default_factory=list)
    policy: ReportPolicy
    require: list[VerdictLabel] = Field(default_factory=list)
    require_confident: bool = Field(
        default=False, description="strict gate (spec.require_confident, --strict): a borderline verdict does not pass")
    passed: bool | None = None


# --------------------------------------------------------------------------- the other sections
class MemoryFormat(ReportModel):
    used: Literal["contiguous", "channels_last"]
    reason: str


class Autocast(ReportModel):
    """bf16 autocast of the forward passes (``options.autocast_bf16``)."""

    dtype: str | None
    used: bool
    max_relative_logit_error: float | None = None
    tolerance: float | None = None
    note: str


class ModelSection(ReportModel):
    """The audited model as the engine loaded it."""

    format: str
    sha256: str | None
    input_shape: list[int]
    num_classes: int
    device: str
    providers: list[str] = Field(default_factory=list)
    saliency_method: str | None = None
    gradient_path: str | None = None
    twin_max_error: float | None = None
    gradient_note: str | None = None
    output_kind: str | None = None
    output_note: str | None = None
    autocast: Autocast | None = None
    memory_format: MemoryFormat | None = None


class SampledGroup(ReportModel):
    size: int
    group_order: int
    method: str
    seed: int
    with_replacement: bool


class GroupSection(ReportModel):
    """The group the audit ran: its elements and whether its action is exact."""

    name: str
    order: int
    exact: bool
    elements: list[str]
    spec: GroupSpec | None = None
    note: str | None = None
    sampled: SampledGroup | None = None
    interpolation_error: float | None = None


class SigmaMax(ReportModel):
    mean: float
    p5: float
    p95: float


class Sensitivity(ReportModel):
    """The input-output Jacobian's largest singular value and its leading spectrum."""

    sigma_max: SigmaMax | None
    spectrum: list[float]
    n_probes: int
    probes: str
    method: str
    note: str | None = None

    @property
    def sigma_max_mean(self) -> float | None:
        return self.sigma_max.mean if self.sigma_max is not None else None


class SaliencyExample(ReportModel):
    """One of the worst (x, g) pairs by saliency similarity, with its maps for the HTML report."""

    condition: str
    probe: int
    element: str
    similarity: float | None
    LI: float = Field(description="the pair's logit error 1/2 ||f(x) - f(gx)||^2 (breaks ties in similarity)")
    map_x: list[Any] = Field(description="m(x): |IG| thresholded at 0.9 max and filtered, channels summed")
    map_gx_aligned: list[Any] = Field(description="g^-1 m(gx), in x's frame")
    image_x: list[Any] | None = Field(default=None, description="the probe, downsampled to at most 48 px a side")
    image_gx: list[Any] | None = Field(default=None, description="g x, downsampled like image_x")
    raw_x: list[Any] | None = Field(default=None, description="raw |integrated gradients| of x, channels summed")
    raw_gx: list[Any] | None = Field(default=None, description="raw |integrated gradients| of g x, in g x's frame")


class SkippedShift(ReportModel):
    shift: str
    reason: str


class SkippedCondition(ReportModel):
    name: str
    reason: str


class SaliencyScope(ReportModel):
    scope: Literal["decisive", "all", "none"]
    computed_on: list[str]
    reason: str | None = None


class EarlyStop(ReportModel):
    enabled: bool
    stopped: bool
    reason: str | None
    conditions_skipped: list[SkippedCondition]
    sensitivity_skipped: bool


class Timing(ReportModel):
    """Seconds per stage; ``conditions_s`` / ``saliency_s`` by condition name."""

    load_s: float | None = None
    conditions_s: dict[str, float] = Field(default_factory=dict)
    saliency_s: dict[str, float] | None = None
    sensitivity_s: float | None = None
    total_s: float | None = None
    device: str | None = None


class Symmetrized(ReportModel):
    """For a model that is not genuine: what its orbit average (``audit-service symmetrize``) costs and keeps."""

    available: bool = Field(description="false for sampled or interpolated groups")
    forward_passes_per_sample: int
    accuracy: float | None = Field(description="the symmetrized model's accuracy on the labeled probes")
    accuracy_original: float | None
    how: str
    note: str | None = None


class ProfileRun(ReportModel):
    """A reference profile: one (group, model) averaged over its shipped seeds."""

    name: str
    group: str
    model: str
    n_runs: int
    vector: dict[str, float | None] = Field(description='{"clean.DI": ..., "noise.SI": ...}')


class ReferenceProfile(ReportModel):
    """The closest shipped reference run (attached by the service and the CLI; null for trivial models)."""

    name: str
    model: str
    group: str
    distance: float
    explanation: str
    vector: dict[str, float | None]
    reference_vector: dict[str, float | None]
    runs: list[ProfileRun] = Field(default_factory=list)


class MlflowWriteBack(ReportModel):
    """``model_uri`` audits with ``mlflow_write_back=true``: the worker's write-back to the registry, done
    before the job is recorded as succeeded (a failure here never fails the audit)."""

    status: Literal["written", "failed"]
    uri: str
    version: str | None = Field(default=None, description="the model version the alias named at submission")
    attempts: int
    tags: dict[str, str] | None = Field(default=None, description="the tags set (written)")
    error: str | None = Field(default=None, description="why it failed (failed)")


# --------------------------------------------------------------------------- the report
class Report(ReportModel):
    """The engine's report of one audit."""

    #: the sections every report has (``spec.REPORT_KEYS``, the contract since schema 1.0): required fields here
    REQUIRED: ClassVar[tuple[str, ...]] = REPORT_KEYS

    schema_version: str
    service_version: str | None = None
    created_at: str | None = None
    model: ModelSection
    group: GroupSection
    conditions: list[Condition]
    sensitivity: Sensitivity
    verdict: Verdict
    saliency_examples: list[SaliencyExample] = Field(default_factory=list)
    spec: ReportSpec | None = None
    shifts_skipped: list[SkippedShift] = Field(default_factory=list)
    saliency: SaliencyScope | None = None
    early_stop: EarlyStop | None = None
    timing: Timing
    reference_profile: ReferenceProfile | None = None
    symmetrized: Symmetrized | None = Field(
        default=None, description="for a model that is not genuine: what its orbit average costs and keeps")
    mlflow_write_back: MlflowWriteBack | None = None

    def condition(self, name: str) -> Condition:
        """The condition called ``name``; a KeyError names the conditions the audit ran."""
        for c in self.conditions:
            if c.name == name:
                return c
        raise KeyError(f"no condition {name!r}; the audit ran {[c.name for c in self.conditions]}")

    def find(self, name: str) -> Condition | None:
        return next((c for c in self.conditions if c.name == name), None)

    @property
    def clean(self) -> Condition | None:
        return self.find(ConditionName.CLEAN)

    @property
    def noise(self) -> Condition | None:
        return self.find(ConditionName.NOISE)

    @property
    def headline_condition(self) -> Condition | None:
        """The clean probes' condition; without probes, the first one (noise)."""
        return self.clean or (self.conditions[0] if self.conditions else None)


def parse_report(report: dict[str, Any] | Report, strict: bool = False) -> Report:
    """The typed report of a JSON dict (a ``Report`` is returned as it is). ``strict``: an unmodelled key
    anywhere is a ValidationError (tests, and the OpenAPI sync check)."""
    if isinstance(report, Report):
        return report
    return Report.model_validate(report, context={STRICT: True} if strict else None)
