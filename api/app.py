"""The Flask application factory: `create_app(settings=None)` (gunicorn: `api.app:create_app()`)."""

from __future__ import annotations

import weakref

from apiflask import APIFlask

from api.context import Services
from api.errors import ERROR_SCHEMA, register_error_handlers
from api.json_provider import OrjsonProvider
from core.db import make_engine
from core.settings import Settings
from core.storage import Storage

# The reader's connections, all kept: an overflow connection is closed when given back, so a pool smaller
# than the reads in flight opened and closed a Postgres backend every few requests (bench.bench_get:
# 2 ms of Postgres CPU per GET at 32 connections). More reads than this wait for a connection.
READ_POOL = 8
# A read that waits this long for one of them answers 503 database_busy instead of hanging its client.
READ_POOL_TIMEOUT_S = 5.0


def create_app(settings: Settings | None = None) -> APIFlask:
    """Build the API for `settings` (default: read from the environment)."""
    settings = settings or Settings.from_env()
    settings.require("database_url", "s3_endpoint_url")
    app = APIFlask(
        "nexusgen", title="Nexus-Gen batch API", version="1", docs_path="/docs", spec_path="/openapi.json"
    )
    app.json = OrjsonProvider(app)
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        # Every error answer, validation errors included, has the shape {"error": {code, message, details}}.
        HTTP_ERROR_SCHEMA=ERROR_SCHEMA,
        VALIDATION_ERROR_SCHEMA=ERROR_SCHEMA,
        VALIDATION_ERROR_STATUS_CODE=422,
        INFO={
            "description": "Asynchronous batch jobs for Nexus-Gen V2: text-to-image, image editing and image "
            'understanding. Every error is `{"error": {"code", "message", "details"}}`.'
        },
        SERVERS=[{"url": settings.public_base_url}],
    )
    services = Services(
        settings=settings,
        engine=make_engine(settings),
        reader=make_engine(
            settings, READ_POOL, autocommit=True, max_overflow=0, pool_timeout_s=READ_POOL_TIMEOUT_S
        ),
        storage=Storage.from_settings(settings),
    )
    app.extensions["nexusgen"] = services

    from api import batches, docs, events, jobs, ops, uploads, usage, webhooks

    docs.configure_docs(app)

    app.extensions["nexusgen_metrics"] = ops.make_registry(services.engine, settings)
    for module in (uploads, jobs, batches, events, usage, ops, webhooks):
        app.register_blueprint(module.bp)
    register_error_handlers(app)
    _close_on_teardown(app, services)
    return app


def _close_on_teardown(app: APIFlask, services: Services) -> None:
    """Give the pool back when the app object goes away (tests build many apps)."""
    weakref.finalize(app, services.engine.dispose)
    weakref.finalize(app, services.reader.dispose)
