"""``build_group``: a validated group spec + the model's per-sample input shape -> a :class:`Group`;
``group_catalogue``: what ``GET /groups`` lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, TypeAdapter, ValidationError

from ..errors import SpecError
from ..spec import (
    C4Spec,
    D4Spec,
    FlipSpec,
    GroupSpec,
    PermutationSpec,
    ProductSpec,
    RotationSpec,
    TranslationSpec,
    _expand_group_shorthand,
    _format_validation_error,
)
from .base import Group, shape_str
from .image import build_c4, build_d4, build_flip
from .permutation import build_permutation
from .product import build_product
from .rotation import build_rotation
from .translation import build_translation

_ADAPTER: TypeAdapter = TypeAdapter(GroupSpec)


@dataclass(frozen=True)
class GroupRecord:
    """Everything the service knows about one group name, in one place: its spec model, its builder
    (spec, input shape, field) -> Group, what it is exact on, what inputs it fits, an example spec and
    what its parameters mean. ``build_group`` and ``GET /groups`` read only this table."""

    spec: type[BaseModel]
    builder: Callable[..., Group] | None  # None: built by build_group itself (products recurse)
    exact: bool | str
    fits: str
    example: dict[str, Any]
    meanings: dict[str, str] = field(default_factory=dict)


GROUPS: dict[str, GroupRecord] = {
    "C4": GroupRecord(C4Spec, build_c4, True, "square images: rank >= 2 with H == W (the last two axes)",
                      {"name": "C4"}),
    "D4": GroupRecord(D4Spec, build_d4, True, "square images: rank >= 2 with H == W (the last two axes)",
                      {"name": "D4"}),
    "flip": GroupRecord(FlipSpec, build_flip, True, "inputs of rank >= 2 (the last two axes are H, W)",
                        {"name": "flip", "axis": "horizontal"},
                        {"axis": "'horizontal' mirrors the last axis (W), 'vertical' the second to last (H)"}),
    "translation": GroupRecord(
        TranslationSpec, build_translation, True, "any input; `axis` must exist and be longer than `step`",
        {"name": "translation", "order": 3, "step": 12, "axis": -1},
        {"order": "number of shifts k = 0..order-1",
         "step": "shift per element along the axis (samples / pixels); must be smaller than the axis length",
         "axis": "per-sample axis to roll along (batch excluded); -1 is W for images, the features for (D,)"}),
    "permutation": GroupRecord(
        PermutationSpec, build_permutation, True, "any input; generators have the length of `axis`",
        {"name": "permutation", "generators": [[1, 2, 0], [1, 0, 2]], "axis": 0},
        {"generators": "permutations of 0..n-1 (n = length of the axis); out[..., j, ...] = x[..., p[j], ...]",
         "axis": "per-sample axis the generators permute",
         "max_order": "enumerate groups up to this many elements; larger ones are sampled (or refused, sample = 0)",
         "sample": "past max_order: audit on the identity and sample - 1 uniformly drawn elements (0: refuse)",
         "seed": "seed of the element sample"}),
    "rotation": GroupRecord(
        RotationSpec, build_rotation, False, "square images: rank >= 2 with H == W",
        {"name": "rotation", "n_angles": 8, "interpolation": "bilinear"},
        {"n_angles": "angles 360 k / n_angles, k = 0..n_angles-1",
         "interpolation": "resampling of the rotated image"}),
    "product": GroupRecord(
        ProductSpec, None, "when every factor is exact", "inputs every factor fits",
        {"name": "product", "factors": [{"name": "flip", "axis": "vertical"},
                                        {"name": "translation", "order": 4, "step": 7}]},
        {"factors": "group specs (any of these names); every combination of one element of each"}),
}
_BUILDERS = {record.spec: record.builder for record in GROUPS.values() if record.builder is not None}




def build_group(spec: GroupSpec | dict | str, input_shape: tuple[int, ...], field: str = "group") -> Group:
    """The group ``spec`` describes, acting on samples of ``input_shape`` ((C, H, W), (D,), ...).

    ``spec`` is a parsed ``GroupSpec`` (a dict or a bare name such as ``"C4"`` is parsed first).
    Raises ``SpecError`` naming the field (``group.step``, ``group.factors[1]``, ...) when the spec does not
    fit the input shape.
    """
    if not isinstance(spec, BaseModel):
        try:
            spec = _ADAPTER.validate_python(_expand_group_shorthand(spec))
        except ValidationError as err:
            raise _format_validation_error(err, prefix=field) from None
    input_shape = tuple(int(s) for s in input_shape)
    if not input_shape or any(s < 1 for s in input_shape):
        raise SpecError(f"Expected a per-sample input shape of positive sizes, but got {shape_str(input_shape)}",
                        field="model.input_shape")
    if isinstance(spec, ProductSpec):  # builds its factors with build_group
        return build_product(spec, input_shape, build_group, field)
    builder = _BUILDERS.get(type(spec))
    if builder is None:
        raise SpecError(f"Expected a group spec, but got {type(spec).__name__}", field=field)
    return builder(spec, input_shape, field)


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
        out.append({
            "name": name,
            "description": (model.__doc__ or "").strip(),
            "exact": record.exact,
            "parameters": params,
            "fits": record.fits,
            "example": record.example,
        })
    return out
