"""The one record per group kind (``GROUPS``) and what reads it: ``build_group`` (a validated group spec +
the model's per-sample input shape -> a :class:`Group`), ``group_catalogue`` (what ``GET /groups`` lists) and
the front page's group choice.

Adding a group: write its spec model (a ``GroupSpecModel`` with ``name: Literal["..."]``) and its builder,
then ``register_group(GroupRecord(...))`` (or one entry below). The spec parser, ``build_group``, the
catalogue and the front page all read the registry; nothing else lists group names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel

from ..errors import SpecError
from ..spec import (
    C4Spec,
    D4Spec,
    FlipSpec,
    GROUP_SPEC_MODELS,
    GroupSpecModel,
    PermutationSpec,
    ProductSpec,
    RotationSpec,
    TranslationSpec,
    parse_group_spec,
    register_group_spec,
    spec_name,
    unregister_group_spec,
)
from .base import Group, shape_str
from .image import build_c4, build_d4, build_flip
from .permutation import build_permutation
from .product import build_product
from .rotation import build_rotation
from .translation import build_translation

#: (spec, per-sample input shape, field to name in errors) -> the group
Builder = Callable[[Any, tuple[int, ...], str], Group]


@dataclass(frozen=True)
class GroupRecord:
    """Everything the service knows about one group kind, in one place: its spec model (whose ``name``
    Literal is the kind's name and whose docstring is its description), its builder, what it is exact on,
    what inputs it fits, an example spec and what its parameters mean."""

    spec: type[GroupSpecModel]
    builder: Builder
    exact: bool | str
    fits: str
    example: dict[str, Any]
    meanings: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return spec_name(self.spec)


def _build_product(spec: ProductSpec, input_shape: tuple[int, ...], field: str) -> Group:
    return build_product(spec, input_shape, build_group, field)  # builds its factors with build_group


_BUILT_IN = (
    GroupRecord(C4Spec, build_c4, True, "square images: rank >= 2 with H == W (the last two axes)", {"name": "C4"}),
    GroupRecord(D4Spec, build_d4, True, "square images: rank >= 2 with H == W (the last two axes)", {"name": "D4"}),
    GroupRecord(
        FlipSpec,
        build_flip,
        True,
        "inputs of rank >= 2 (the last two axes are H, W)",
        {"name": "flip", "axis": "horizontal"},
        {"axis": "'horizontal' mirrors the last axis (W), 'vertical' the second to last (H)"},
    ),
    GroupRecord(
        TranslationSpec,
        build_translation,
        True,
        "any input; `axis` must exist and be longer than `step`",
        {"name": "translation", "order": 3, "step": 12, "axis": -1},
        {
            "order": "number of shifts k = 0..order-1",
            "step": "shift per element along the axis (samples / pixels); must be smaller than the axis length",
            "axis": "per-sample axis to roll along (batch excluded); -1 is W for images, the features for (D,)",
        },
    ),
    GroupRecord(
        PermutationSpec,
        build_permutation,
        True,
        "any input; generators have the length of `axis`",
        {"name": "permutation", "generators": [[1, 2, 0], [1, 0, 2]], "axis": 0},
        {
            "generators": "permutations of 0..n-1 (n = length of the axis); out[..., j, ...] = x[..., p[j], ...]",
            "axis": "per-sample axis the generators permute",
            "max_order": "enumerate groups up to this many elements; larger ones are sampled (or refused, sample = 0)",
            "sample": "past max_order: audit on the identity and sample - 1 uniformly drawn elements (0: refuse)",
            "seed": "seed of the element sample",
        },
    ),
    GroupRecord(
        RotationSpec,
        build_rotation,
        False,
        "square images: rank >= 2 with H == W",
        {"name": "rotation", "n_angles": 8, "interpolation": "bilinear"},
        {"n_angles": "angles 360 k / n_angles, k = 0..n_angles-1", "interpolation": "resampling of the rotated image"},
    ),
    GroupRecord(
        ProductSpec,
        _build_product,
        "when every factor is exact",
        "inputs every factor fits",
        {
            "name": "product",
            "factors": [{"name": "flip", "axis": "vertical"}, {"name": "translation", "order": 4, "step": 7}],
        },
        {"factors": "group specs (any of these names); every combination of one element of each"},
    ),
)
#: name -> record, for every group kind (the built-in ones, then any added with ``register_group``)
GROUPS: dict[str, GroupRecord] = {record.name: record for record in _BUILT_IN}


def register_group(record: GroupRecord) -> GroupRecord:
    """Add (or replace) a group kind: its spec joins every ``GroupSpec`` field, ``build_group`` builds it and
    the catalogue lists it. The one call a new group needs."""
    register_group_spec(record.spec)
    GROUPS[record.name] = record
    return record


def unregister_group(name: str) -> None:
    """Undo ``register_group`` (e.g. a test's toy group)."""
    GROUPS.pop(name, None)
    unregister_group_spec(name)


def _check_registry() -> None:
    """Every record's spec is one the parser accepts (spec.py registers the built-in ones so that specs parse
    without torch; a record whose spec lives elsewhere registers it here), and every spec has a record."""
    for record in _BUILT_IN:
        if GROUP_SPEC_MODELS.get(record.name) is not record.spec:
            register_group_spec(record.spec)
    missing = [name for name in GROUP_SPEC_MODELS if name not in GROUPS]
    if missing:
        raise TypeError(
            f"Expected a GroupRecord for every registered group spec, but {', '.join(missing)} has "
            "none; add it with register_group"
        )


_check_registry()


def build_group(spec: BaseModel | dict | str, input_shape: tuple[int, ...], field: str = "group") -> Group:
    """The group ``spec`` describes, acting on samples of ``input_shape`` ((C, H, W), (D,), ...).

    ``spec`` is a parsed ``GroupSpec`` (a dict or a bare name such as ``"C4"`` is parsed first).
    Raises ``SpecError`` naming the field (``group.step``, ``group.factors[1]``, ...) when the spec does not
    fit the input shape.
    """
    spec = parse_group_spec(spec, field)
    input_shape = tuple(int(s) for s in input_shape)
    if not input_shape or any(s < 1 for s in input_shape):
        raise SpecError(
            f"Expected a per-sample input shape of positive sizes, but got {shape_str(input_shape)}",
            field="model.input_shape",
        )
    record = GROUPS.get(spec.name)
    if record is None or not isinstance(spec, record.spec):
        raise SpecError(
            f"Expected a group spec registered with register_group, but got {type(spec).__name__}", field=field
        )
    return record.builder(spec, input_shape, field)


def _param_type(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return "one of " + ", ".join(repr(v) for v in prop["enum"])
    if "const" in prop:
        return repr(prop["const"])
    if prop.get("type") == "array":
        return f"list of {_param_type(prop.get('items', {}))}"
    if "$ref" in prop or "oneOf" in prop or "discriminator" in prop:
        return "group spec"
    return str(prop.get("type", "any"))


def group_catalogue() -> list[dict[str, Any]]:
    """One entry per group name: description, parameters (type, default, meaning, bounds), fits, example."""
    out = []
    for name, record in GROUPS.items():
        model = record.spec
        schema = model.model_json_schema()
        if "properties" not in schema:  # a recursive model: the schema is a $ref into $defs
            schema = schema["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
        params = {}
        for pname, field_info in model.model_fields.items():
            if pname == "name":
                continue
            prop = schema["properties"][pname]
            entry: dict[str, Any] = {
                "type": _param_type(prop),
                "default": None if field_info.is_required() else field_info.get_default(call_default_factory=True),
                "required": field_info.is_required(),
                "meaning": record.meanings.get(pname, ""),
            }
            for bound in ("minimum", "maximum", "minItems"):
                if bound in prop:
                    entry[bound] = prop[bound]
            params[pname] = entry
        out.append(
            {
                "name": name,
                "description": (model.__doc__ or "").strip(),
                "exact": record.exact,
                "parameters": params,
                "fits": record.fits,
                "example": record.example,
            }
        )
    return out
