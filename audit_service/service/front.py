"""The front door: ``/`` (a page to submit a model, follow the job and see the verdict, and the caller's
recent audits), ``/docs`` (Swagger UI served from the ``swagger-ui-bundle`` package, no CDN) and its
static files. The pages hold no data: their scripts call the API with the caller's token, so they are public
(``auth.PUBLIC_PATHS``, ``auth.PUBLIC_PREFIXES``)."""

from __future__ import annotations

from flask import Blueprint, Response, abort, current_app, render_template, send_from_directory

from .. import __version__

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
    return _html(render_template("front.html", version=__version__, tokens=_tokens_on()))


@bp.get("/docs")
def docs() -> Response:
    return _html(render_template("docs.html", version=__version__))


@bp.get("/docs/static/<path:name>")
def docs_static(name: str) -> Response:
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:  # pragma: no cover - a dependency; the page says what is missing
        abort(404)
    return send_from_directory(str(swagger_ui_path), name, max_age=3600)
