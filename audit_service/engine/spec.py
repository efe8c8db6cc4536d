"""The JSON contract: what a client asks for (``AuditSpec``) and the policy it is judged by.

One schema for the CLI, the Python API and ``POST /audit``. Group specs are a union tagged on
``name`` over the registered group kinds (``GROUP_SPEC_MODELS``; ``groups.build.register_group`` adds one);
a bare string such as ``"C4"`` is shorthand for ``{"name": "C4"}``. Shift names and what strength each
takes are in ``SHIFT_PARAMETERS`` (``shifts.registry.register_shift`` adds one). The report itself
is built as a plain dict by :mod:`audit_service.engine.report` and its keys are listed in
``REPORT_KEYS`` (the contract other issues build on).
"""

from __future__ import annotations

import functools
import json
import math
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError, core_schema

from .errors import SpecError

SCHEMA_VERSION = "1.0"
REPORT_KEYS = ("schema_version", "model", "group", "conditions", "sensitivity", "verdict", "timing")

#: Largest group the service will enumerate (orbits are materialised as batches).
MAX_GROUP_ORDER = 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------- groups
#: Every group kind's spec model by name, in the order registered: the built-in ones below, then any group
#: added with ``groups.build.register_group`` (its one record). ``GroupSpec`` fields accept exactly these.
GROUP_SPEC_MODELS: dict[str, type[GroupSpecModel]] = {}


class GroupSpecModel(_Strict):
    """Base of a group kind's spec: ``name`` is a one-value ``Literal``; the docstring is its catalogue text."""

    name: str

    def known_order(self) -> int | None:
        """The group's order as read off the spec (None when only building it tells, e.g. a closure)."""
        return None


def spec_name(model: type[BaseModel]) -> str:
    """The tag of a spec model: the one value of its ``name: Literal[...]`` field."""
    values = typing.get_args(model.model_fields["name"].annotation)
    if len(values) != 1 or not isinstance(values[0], str):
        raise TypeError(
            f"Expected {model.__name__}.name to be a one-value Literal, but got {model.model_fields['name'].annotation}"
        )
    return values[0]


@functools.lru_cache(maxsize=1)
def _group_adapter() -> TypeAdapter:
    return TypeAdapter(GroupSpec)


def register_group_spec(model: type[GroupSpecModel]) -> type[GroupSpecModel]:
    """Make ``model`` a choice of every ``GroupSpec`` field (usable as a class decorator).

    A name registered again is replaced. The models holding a ``GroupSpec`` are rebuilt so that specs
    parsed from now on accept it.
    """
    if not (isinstance(model, type) and issubclass(model, GroupSpecModel)):
        raise TypeError(f"Expected a GroupSpecModel subclass, but got {model!r}")
    GROUP_SPEC_MODELS[spec_name(model)] = model
    _rebuild_group_holders()
    return model


def unregister_group_spec(name: str) -> None:
    """Undo ``register_group_spec`` (a test's toy group, a plugin unloaded); unknown names are ignored."""
    if GROUP_SPEC_MODELS.pop(name, None) is not None:
        _rebuild_group_holders()


def _rebuild_group_holders() -> None:
    """Rebuild every model defined so far that holds a ``GroupSpec`` (``AuditSpec``, ``ProductSpec``, a report
    model...) or holds such a model, innermost first, so each one's schema has the union as it is now."""
    for model in _group_holders():
        model.model_rebuild(force=True, raise_errors=False)
    _group_adapter.cache_clear()


def _group_holders() -> list[type[BaseModel]]:
    """The defined models with a ``GroupSpec`` field or a field of such a model, each after those it holds."""
    models, seen = [], set()
    stack = list(BaseModel.__subclasses__())
    while stack:
        model = stack.pop()
        if model not in seen:
            seen.add(model)
            models.append(model)
            stack.extend(model.__subclasses__())
    holders: set[type[BaseModel]] = set()
    while True:
        more = {
            m
            for m in models
            if m not in holders
            and any(_holds(f.annotation, holders) or _holds_meta(f.metadata) for f in m.model_fields.values())
        }
        if not more:
            break
        holders |= more
    ordered: list[type[BaseModel]] = []

    def visit(model: type[BaseModel], path: tuple[type[BaseModel], ...]) -> None:
        if model in ordered or model in path:
            return
        for f in model.model_fields.values():
            for inner in holders:
                if inner is not model and _refers(f.annotation, {inner}):
                    visit(inner, (*path, model))
        ordered.append(model)

    # group spec models that hold group specs (products) come first: every union of group specs embeds them
    for model in sorted(holders, key=lambda m: (not issubclass(m, GroupSpecModel), m.__qualname__)):
        visit(model, ())
    return ordered


def _holds_meta(metadata: list[Any]) -> bool:
    return any(m is _RegisteredGroups for m in metadata)


def _holds(annotation: Any, found: set[type[BaseModel]]) -> bool:
    """``annotation`` is or contains a ``GroupSpec`` or one of the models in ``found``."""
    return (
        annotation is _RegisteredGroups
        or _refers(annotation, found)
        or any(_holds(arg, found) for arg in typing.get_args(annotation))
    )


def _refers(annotation: Any, models: set[type[BaseModel]]) -> bool:
    """``annotation`` is or contains one of ``models``."""
    if isinstance(annotation, type) and annotation in models:
        return True
    return any(_refers(arg, models) for arg in typing.get_args(annotation))


class _RegisteredGroups:
    """``GroupSpec``'s schema: a union tagged on ``name`` over ``GROUP_SPEC_MODELS`` as it is when a model is
    built (so a group registered later joins when ``register_group_spec`` rebuilds the holders)."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.tagged_union_schema(
            {name: handler.generate_schema(model) for name, model in GROUP_SPEC_MODELS.items()}, discriminator="name"
        )


#: A group spec: one of the registered group kinds' models, chosen by its ``name``.
GroupSpec = Annotated[GroupSpecModel, _RegisteredGroups]


@register_group_spec
class C4Spec(GroupSpecModel):
    """Rotations by multiples of 90 degrees in the (H, W) plane."""

    name: Literal["C4"]

    def known_order(self) -> int | None:
        return 4


@register_group_spec
class D4Spec(GroupSpecModel):
    """The 8 symmetries of the square: C4 rotations and their compositions with a flip."""

    name: Literal["D4"]

    def known_order(self) -> int | None:
        return 8


@register_group_spec
class FlipSpec(GroupSpecModel):
    """The 2-element group {identity, flip}; ``axis`` says which image axis is mirrored."""

    name: Literal["flip"]
    axis: Literal["horizontal", "vertical"] = "horizontal"

    def known_order(self) -> int | None:
        return 2


@register_group_spec
class TranslationSpec(GroupSpecModel):
    """Cyclic translations by ``k * step`` pixels, k = 0..order-1, along ``axis`` (default: last)."""

    name: Literal["translation"]
    order: int = Field(ge=1, le=MAX_GROUP_ORDER)
    step: int = Field(default=1, ge=1)
    axis: int = -1

    def known_order(self) -> int | None:
        return self.order


#: Elements drawn from a permutation group too large to enumerate, unless the spec says otherwise.
DEFAULT_GROUP_SAMPLE = 256


@register_group_spec
class PermutationSpec(GroupSpecModel):
    """The group generated by permutations of one input axis (closure, capped at ``max_order``).

    Past the cap the group is audited on ``sample`` uniformly drawn elements (seeded by ``seed``; the
    identity is always element 0); ``sample = 0`` refuses such groups instead.
    """

    name: Literal["permutation"]
    generators: list[list[int]] = Field(min_length=1)
    axis: int = -1
    max_order: int = Field(default=MAX_GROUP_ORDER, ge=1, le=MAX_GROUP_ORDER)
    sample: int = Field(
        default=DEFAULT_GROUP_SAMPLE,
        ge=0,
        le=MAX_GROUP_ORDER,
        description="elements drawn uniformly when the group has more than max_order; 0: refuse",
    )
    seed: int = Field(default=0, description="seed of the element sample")


@register_group_spec
class RotationSpec(GroupSpecModel):
    """Continuous rotations, sampled at ``n_angles`` evenly spaced angles; interpolated, so inexact."""

    name: Literal["rotation"]
    n_angles: int = Field(default=8, ge=1, le=360)
    interpolation: Literal["bilinear", "nearest"] = "bilinear"

    def known_order(self) -> int | None:
        return self.n_angles


class ProductSpec(GroupSpecModel):
    """Direct product of factor groups: every combination of one element of each factor."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    name: Literal["product"]
    factors: list[GroupSpec] = Field(min_length=1)

    def known_order(self) -> int | None:
        orders = [f.known_order() for f in self.factors]
        return None if any(o is None for o in orders) else math.prod(o for o in orders if o is not None)


register_group_spec(ProductSpec)

#: The built-in group names (``group_names()`` also lists any registered later).
GROUP_NAMES = tuple(GROUP_SPEC_MODELS)


def group_names() -> tuple[str, ...]:
    """Every group name a spec accepts now, built-in and registered."""
    return tuple(GROUP_SPEC_MODELS)


def parse_group_spec(value: Any, field: str = "group") -> GroupSpecModel:
    """A group spec (a parsed model, a dict, or a bare name such as ``"C4"``) validated; ``SpecError`` naming
    the field (``group.translation.step``, ...) otherwise."""
    if isinstance(value, GroupSpecModel):
        return value
    try:
        return _group_adapter().validate_python(_expand_group_shorthand(value))
    except ValidationError as err:
        raise _format_validation_error(err, prefix=field) from None


# ----------------------------------------------------------------------------- shifts
#: Every shift kind's name and what strength it takes: ``"severity"`` (1-5, CIFAR-10-C style) or ``"beta"``
#: (a mixing weight in [0, 1] toward a ``target``, as the paper's blend). The built-in kinds are listed here so
#: that specs parse without torch; their records (severity table, action, catalogue text) are in
#: ``shifts.registry.SHIFTS``, and ``shifts.registry.register_shift`` adds a kind to both.
SHIFT_PARAMETERS: dict[str, Literal["severity", "beta"]] = {
    "gaussian_noise": "severity",
    "blur": "severity",
    "contrast": "severity",
    "brightness": "severity",
    "occlusion": "severity",
    "blend": "beta",
}
#: The built-in shift names (``shift_names()`` also lists any registered later).
ShiftName = Literal["gaussian_noise", "blur", "contrast", "brightness", "occlusion", "blend"]
SHIFT_NAMES: tuple[str, ...] = tuple(SHIFT_PARAMETERS)
#: Severity of a shift spec that names none.
DEFAULT_SEVERITY = 3


def shift_names() -> tuple[str, ...]:
    """Every shift name a spec accepts now, built-in and registered."""
    return tuple(SHIFT_PARAMETERS)


def register_shift_name(name: str, takes: Literal["severity", "beta"]) -> None:
    """Let specs name the shift ``name`` (its record: ``shifts.registry.register_shift``)."""
    if takes not in ("severity", "beta"):
        raise ValueError(f"Expected `takes` to be 'severity' or 'beta', but got {takes!r}")
    SHIFT_PARAMETERS[name] = takes


class ShiftSpec(_Strict):
    """One input shift. ``severity`` 1-5 (CIFAR-10-C convention); ``blend`` takes ``beta`` instead.

    ``blend`` is the paper's D_{1->2}(beta) = (1-beta) x + beta x2 where x2 is uniform noise
    (``target="noise"``) or the client's second probe set (``target="second_probes"``).
    """

    name: str = Field(json_schema_extra={"enum": list(SHIFT_NAMES)})
    severity: int | None = Field(default=None, ge=1, le=5)
    beta: float | None = Field(default=None, ge=0.0, le=1.0)
    target: Literal["noise", "second_probes"] = "noise"

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str) -> str:
        if name not in SHIFT_PARAMETERS:
            names = [repr(n) for n in SHIFT_PARAMETERS]
            raise PydanticCustomError(
                "literal_error", "Input should be {expected}", {"expected": ", ".join(names[:-1]) + " or " + names[-1]}
            )
        return name

    @property
    def takes_beta(self) -> bool:
        """The shift mixes toward a ``target`` by ``beta`` (blend) instead of taking a severity."""
        return SHIFT_PARAMETERS[self.name] == "beta"

    @model_validator(mode="after")
    def _check_parameters(self) -> "ShiftSpec":
        if self.takes_beta:
            if self.beta is None:
                raise ValueError(f"Expected `beta` in [0, 1] for the {self.name} shift, but got none")
            if self.severity is not None:
                raise ValueError(f"Expected no `severity` for the {self.name} shift (it takes `beta`)")
        else:
            if self.beta is not None:
                raise ValueError(f"Expected no `beta` for the {self.name} shift (only {_beta_names()} takes it)")
            if self.target != "noise":
                raise ValueError(f"Expected no `target` for the {self.name} shift (only {_beta_names()} takes it)")
        return self

    @property
    def severity_or_default(self) -> int:
        return self.severity if self.severity is not None else DEFAULT_SEVERITY

    @property
    def label(self) -> str:
        """The condition name in the report, e.g. ``blur@3`` or ``blend(noise)@0.5``."""
        if self.takes_beta:
            return f"{self.name}({self.target})@{self.beta:g}"
        return f"{self.name}@{self.severity_or_default}"


def _beta_names() -> str:
    return "/".join(name for name, takes in SHIFT_PARAMETERS.items() if takes == "beta")


#: shift conditions one audit may sweep (each costs a pass over every probe's orbit; the default sweep has 9)
MAX_SHIFTS = 64


def default_shifts() -> list[ShiftSpec]:
    """Three shifts at three severities: enough for a metric-vs-severity curve, cheap enough to run."""
    return [ShiftSpec(name=name, severity=s) for name in ("gaussian_noise", "blur", "contrast") for s in (1, 3, 5)]


# ----------------------------------------------------------------------------- policy
class Policy(_Strict):
    """Verdict thresholds. Named and versioned; every field can be overridden per request.

    Version 3 (docs/audit.md, "The verdict"): every agreement / kappa / DI / SI / LI_normalized criterion is
    computed over the non-identity elements g != e; ``learned`` needs labels that show the task was learned
    (``learned_accuracy_kappa_min``), otherwise the invariance is ``incidental`` (labels at chance) or
    ``undecided`` (no labels); ``trivial`` by logit spread is scale-free and at float rounding
    (``trivial_relative_spread_max`` replaces version 2's ``trivial_variation_max``).

    Calibrated on the shipped reference runs, untrained torchvision networks and small CNNs trained with and
    without augmentation (``benchmarks/calibrate_verdict.py``): the genuine bounds sit between the weight-tied
    networks (LI_normalized and DI exactly 0, SI 1.00 everywhere) and the best invariance-regularized ones (clean
    LI_normalized ~2e-4, SI 0.92-0.94 over g != e); the prediction bounds below the augmented networks (clean
    agreement over g != e 0.92-1.00, kappa 0.91-1.00) and above a CNN trained without augmentation.
    """

    name: str = "moskalev2023"
    version: str = "3"
    # genuine: must hold on clean probes, under every shift and on pure noise (g != e)
    genuine_li_normalized_max: float = Field(default=1e-5, ge=0)
    genuine_di_max: float = Field(default=1e-5, ge=0)
    genuine_si_min: float = Field(default=0.98, ge=-1, le=1)
    genuine_agreement_min: float = Field(default=0.99, ge=0, le=1)
    # invariant predictions on in-distribution probes, clearly above chance (g != e)
    learned_agreement_min: float = Field(default=0.8, ge=0, le=1)
    learned_di_max: float = Field(default=0.5, ge=0)
    #: Cohen's kappa of the clean agreement against its chance level
    learned_kappa_min: float = Field(default=0.5, ge=-1, le=1)
    #: learned, not incidental: clean orbit accuracy corrected for the majority-label rate,
    #: (acc - chance) / (1 - chance); needs labels (without them the label is `undecided`)
    learned_accuracy_kappa_min: float = Field(default=0.5, ge=-1, le=1)
    # trivial: one predicted class for every clean probe and orbit element (needs at least this many probes)
    trivial_single_class_min_probes: int = Field(default=2, ge=1)
    #: trivial: the class-centred logits' spread across probes over the logits' own size (``relative_spread``) at
    #: or below this on clean and noise; float32 rounding is ~1e-7, so 1e-6 is ~8 units in the last place
    trivial_relative_spread_max: float = Field(default=1e-6, ge=0)
    # flagged (not failed): invariance that may come from insensitivity; trained reference runs sit at 1.6-1.9
    low_sensitivity_variation: float = Field(default=1e-3, ge=0)


class Options(_Strict):
    """How the sweep runs. Defaults suit a CPU; raise ``n_probes`` / ``ig_steps`` on a GPU."""

    n_probes: int = Field(default=64, ge=1, le=100_000, description="probes used from the client's set")
    n_noise_probes: int = Field(default=32, ge=1, le=10_000, description="uniform-noise probes")
    ig_steps: int = Field(default=16, ge=1, le=512, description="integrated-gradients steps")
    saliency: bool = Field(default=True, description="compute SI (costs ig_steps backward passes)")
    saliency_scope: Literal["decisive", "all", "none"] = Field(
        default="decisive",
        description="where SI is computed: 'decisive' on clean and noise, and on every shift only when the "
        "model meets the genuine criteria everywhere else (SI then decides); 'all' on every "
        "condition; 'none' nowhere",
    )
    early_stop: bool = Field(
        default=False,
        description="once clean and noise settle the verdict (a genuine criterion fails there), skip the shift "
        "conditions and the Jacobian, which would only fill the report; the report lists what was skipped",
    )
    autocast_bf16: bool = Field(
        default=False,
        description="CUDA only, torch runtimes: forward-only logits under bf16 autocast, used only when a "
        "check against fp32 on the first probes is within tolerance (else fp32, said in the report)",
    )
    memory_format: Literal["auto", "contiguous", "channels_last"] = Field(
        default="auto",
        description="layout of the torch passes: 'auto' converts a convolutional model's weights to "
        "channels-last for image inputs on the CPU (1.35-1.76x faster there); either way the choice is "
        "checked against the contiguous logits first and undone if the model fails or differs",
    )
    jacobian_probes: int = Field(default=16, ge=0, le=10_000)
    batch_size: int = Field(default=1024, ge=1, le=1_000_000, description="model batch (samples)")
    probe_chunk: int = Field(default=64, ge=1, le=100_000, description="probes per streamed chunk")
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="seeds every random choice of the audit")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bootstrap: int = Field(default=200, ge=0, le=10_000)


VerdictLabel = Literal["genuine", "learned", "incidental", "undecided", "not_invariant", "trivial", "not_genuine"]
#: the labels the verdict can give, in that order (what a gate may name)
VERDICT_LABELS: tuple[VerdictLabel, ...] = typing.get_args(VerdictLabel)
#: The default gate: the model has invariance of some kind.
DEFAULT_REQUIRE: tuple[VerdictLabel, ...] = ("genuine", "learned")


class AuditSpec(_Strict):
    """Everything a client can ask of one audit, besides the model and probe files."""

    group: GroupSpec
    shifts: list[ShiftSpec] | None = Field(
        default=None, max_length=MAX_SHIFTS, description="None: the default shift sweep"
    )
    options: Options = Options()
    policy: Policy = Policy()
    require: list[VerdictLabel] = Field(
        default=list(DEFAULT_REQUIRE), min_length=1, description="the gate: verdict labels that pass"
    )
    require_confident: bool = Field(
        default=False,
        description="strict gate: a borderline verdict (a deciding criterion's 95% interval straddles its "
        "threshold) fails even when its label is in `require` (the CLI's --strict)",
    )

    @field_validator("group", mode="before")
    @classmethod
    def _name_shorthand(cls, value: Any) -> Any:
        return _expand_group_shorthand(value)

    @property
    def effective_shifts(self) -> list[ShiftSpec]:
        return default_shifts() if self.shifts is None else list(self.shifts)


def _expand_group_shorthand(value: Any) -> Any:
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict) and value.get("name") == "product":
        factors = value.get("factors")
        if isinstance(factors, list):
            return {**value, "factors": [_expand_group_shorthand(f) for f in factors]}
    return value


def _format_validation_error(err: ValidationError, prefix: str = "") -> SpecError:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    field = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
    msg = first["msg"]
    if first["type"] == "union_tag_invalid" or "does not match any of the expected tags" in msg:
        msg = f"unknown group; expected one of {', '.join(group_names())}"
    elif first["type"] == "literal_error":
        msg = f"{msg}, but got {first.get('input')!r}"
    elif first["type"] == "extra_forbidden":
        msg = "unknown field; remove it (see GET /groups and GET /shifts for the accepted fields)"
    n_more = len(err.errors()) - 1
    if n_more:
        msg += f" (and {n_more} more problem{'s' if n_more > 1 else ''})"
    return SpecError(msg, field=field or None)


def parse_audit_spec(data: dict | str) -> AuditSpec:
    """Validate a spec (dict or JSON text) into an ``AuditSpec``; raise ``SpecError`` naming the field."""
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            raise SpecError(f"Expected a JSON object, but the text does not parse: {exc}", field="spec") from None
    if not isinstance(data, dict):
        raise SpecError(f"Expected a JSON object, but got {type(data).__name__}", field="spec")
    try:
        return AuditSpec.model_validate(data)
    except ValidationError as err:
        raise _format_validation_error(err) from None


def read_json_arg(text: str, field: str, bare_path: bool = False) -> Any:
    """A CLI value that holds JSON: the text itself or ``@file.json`` (or, with ``bare_path``, a path).

    Text that is neither JSON nor a file reference is returned unchanged (e.g. a group name).
    """
    text = text.strip()
    if text.startswith("@") or (bare_path and not text.startswith(("{", "["))):
        path = Path(text.removeprefix("@"))
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise SpecError(
                f"Expected JSON text or a readable JSON file, but {path}: {exc.strerror}", field=field
            ) from None
    if not text.startswith(("{", "[")):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"Expected JSON, but the {field} does not parse: {exc}", field=field) from None


def parse_group_arg(text: str) -> Any:
    """The CLI's ``--group``: a name (``C4``), JSON text, or ``@file.json``."""
    return read_json_arg(text, "group")
