"""The report's other sections: the model, the group, the sensitivity, the saliency examples, the timing, the
reference profile and the write-back."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ..spec import GroupSpec
from .base import ReportModel, statistic

#: what ``sigma_max`` summarizes
_SIGMA = "the Jacobian's largest singular value over the probes"


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
    """A group too large to sweep whole: the elements drawn from it, and how."""

    size: int = Field(description="elements drawn, the identity included")
    group_order: int = Field(description="the order of the whole group")
    method: str = Field(description="how the elements were drawn")
    seed: int
    with_replacement: bool = Field(description="false: each drawn element is uniform over those not yet drawn")


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
    """The Jacobian's largest singular value over the sensitivity probes."""

    mean: float = statistic("mean", _SIGMA)
    p5: float = statistic("p5", _SIGMA)
    p95: float = statistic("p95", _SIGMA)


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
