"""The front door: ``/`` (a page to submit a model, follow the job and see the verdict, and the caller's
recent audits), ``/docs`` (Swagger UI 5, which reads OpenAPI 3.1, served from the ``swagger-ui-py`` package's static
files; no CDN) and its
static files. The pages hold no data: their scripts call the API with the caller's token, so they are public
(``auth.PUBLIC_PATHS``, ``auth.PUBLIC_PREFIXES``)."""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from flask import Blueprint, Response, abort, current_app, render_template, send_from_directory

from .. import __version__
from ..engine.groups.build import GROUPS

bp = Blueprint("front", __name__, template_folder="templates")


def _tokens_on() -> bool:
    auth = current_app.extensions.get("audit_auth")
    return bool(auth is not None and auth.enabled)


def _html(text: str) -> Response:
    response = Response(text, mimetype="text/html")
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/")
def index() -> Response:
    return _html(render_template("front.html", version=__version__, tokens=_tokens_on(), groups=group_choices()))


@lru_cache(maxsize=1)
def group_choices() -> list[dict[str, str]]:
    """One choice per group the service knows (``groups.build.GROUPS``), submitted as its example spec (a
    translation needs its order, a permutation its generators): the page offers nothing the API refuses."""
    choices = []
    for name, record in GROUPS.items():
        params = ", ".join(f"{k} {json.dumps(v)}" for k, v in record.example.items() if k != "name")
        choices.append({"value": json.dumps(record.example), "label": f"{name} ({params})" if params else name,
                        "fits": record.fits})
    return choices


@bp.get("/docs")
def docs() -> Response:
    return _html(render_template("docs.html", version=__version__))


@lru_cache(maxsize=1)
def swagger_ui_dir() -> Path | None:
    """The ``swagger-ui-py`` package's copy of Swagger UI, found without importing the package."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(next(iter(spec.submodule_search_locations))) / "static"
    return static if (static / "swagger-ui-bundle.js").is_file() else None


@bp.get("/docs/static/<path:name>")
def docs_static(name: str) -> Response:
    static = swagger_ui_dir()
    if static is None:  # pragma: no cover - a dependency
        abort(404)
    return send_from_directory(static, name, max_age=3600)
