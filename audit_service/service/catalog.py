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


@bp.get("/groups")
def groups() -> Response:
    from ..engine.groups import group_catalogue  # the one record per group (groups.build.GROUPS)

    return Response(CatalogueOut(items=_as_items(group_catalogue())).model_dump_json(), mimetype="application/json")


@bp.get("/shifts")
def shifts() -> Response:
    from ..engine.shifts import shift_catalogue

    return Response(CatalogueOut(items=_as_items(shift_catalogue())).model_dump_json(), mimetype="application/json")