"""``GET /groups`` and ``GET /shifts``: what a spec may ask for, with each entry's parameters."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response

from .schemas import CatalogueOut

bp = Blueprint("catalog", __name__)


def _as_items(catalogue: Any) -> list[dict]:
    """Catalogues may come as a list of dicts or a dict keyed by name; the API always lists objects."""
    if isinstance(catalogue, dict):
        return [{"name": name, **(entry if isinstance(entry, dict) else {"description": str(entry)})}
                for name, entry in catalogue.items()]
    return [entry if isinstance(entry, dict) else {"name": str(entry)} for entry in catalogue]


def _from_spec_schema(names: tuple[str, ...], models: list) -> list[dict]:
    """Fallback when the catalogue module is not installed: the spec's own JSON schemas."""
    items = []
    for name, model in zip(names, models):
        schema = model.model_json_schema()
        items.append({"name": name, "description": (model.__doc__ or "").strip().splitlines()[0],
                      "parameters": {k: v for k, v in schema.get("properties", {}).items() if k != "name"}})
    return items


@bp.get("/groups")
def groups() -> Response:
    try:
        from ..groups import group_catalogue

        items = _as_items(group_catalogue())
    except ImportError:
        from .. import spec

        items = _from_spec_schema(spec.GROUP_NAMES, [spec.C4Spec, spec.D4Spec, spec.FlipSpec, spec.TranslationSpec,
                                                     spec.PermutationSpec, spec.RotationSpec, spec.ProductSpec])
    return Response(CatalogueOut(items=items).model_dump_json(), mimetype="application/json")


@bp.get("/shifts")
def shifts() -> Response:
    try:
        from ..shifts import shift_catalogue

        items = _as_items(shift_catalogue())
    except ImportError:
        from .. import spec

        schema = spec.ShiftSpec.model_json_schema().get("properties", {})
        items = [{"name": n, "parameters": {k: v for k, v in schema.items() if k != "name"}} for n in spec.SHIFT_NAMES]
    return Response(CatalogueOut(items=items).model_dump_json(), mimetype="application/json")
