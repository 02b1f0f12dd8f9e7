"""Swagger UI for `/docs` served from the pinned `flask-swagger-ui` wheel, so the page works air-gapped."""

from __future__ import annotations

from pathlib import Path

import flask_swagger_ui
from apiflask import APIBlueprint, APIFlask
from flask import Response, abort, send_from_directory

# The Swagger UI 5 distribution the wheel ships (5.x renders OpenAPI 3.1, which apiflask writes).
# Only its files are used, not its blueprint: apiflask renders the page itself.
SWAGGER_UI_DIST = Path(flask_swagger_ui.__file__).parent / "dist"

ASSETS_PATH = "/docs/assets"
# Only the files the /docs page loads; the wheel also holds an index and OAuth pages we do not serve.
ASSETS = frozenset(
    {
        "swagger-ui.css",
        "swagger-ui-bundle.js",
        "swagger-ui-standalone-preset.js",
        "favicon-32x32.png",
        "favicon-16x16.png",
    }
)

bp = APIBlueprint("docs_assets", __name__, enable_openapi=False)


@bp.get(f"{ASSETS_PATH}/<string:name>")
def asset(name: str) -> Response:
    """One static file of the Swagger UI distribution (cached for a day: the version is pinned)."""
    if name not in ASSETS:
        abort(404)
    return send_from_directory(SWAGGER_UI_DIST, name, max_age=86400)


def configure_docs(app: APIFlask) -> None:
    """Point apiflask's Swagger UI page at our own asset routes instead of a public CDN."""
    app.config.update(
        DOCS_UI="swagger-ui",
        SWAGGER_UI_CSS=f"{ASSETS_PATH}/swagger-ui.css",
        SWAGGER_UI_BUNDLE_JS=f"{ASSETS_PATH}/swagger-ui-bundle.js",
        SWAGGER_UI_STANDALONE_PRESET_JS=f"{ASSETS_PATH}/swagger-ui-standalone-preset.js",
        DOCS_FAVICON=f"{ASSETS_PATH}/favicon-32x32.png",
        # no badge that would send the spec to the public online validator
        SWAGGER_UI_CONFIG={"validatorUrl": None},
    )
    app.register_blueprint(bp)
