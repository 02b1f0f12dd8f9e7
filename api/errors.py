"""Every error answer is `{"error": {"code", "message", "details"}}` with a machine-readable code.

Bad input never yields a 500: apiflask sends validation errors and werkzeug's 404, 405 and 413 through
the error processor below; our own input errors (SubmitError, ImageError, ...) map to 4xx here.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

from apiflask import APIFlask, HTTPError
from flask import Response, jsonify
from kombu.exceptions import KombuError
from kombu.exceptions import OperationalError as BrokerError
from minio.error import MinioException
from sqlalchemy.exc import DataError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from urllib3.exceptions import HTTPError as Urllib3Error
from werkzeug.datastructures import Headers

from core.idempotency import IdempotencyConflict
from core.images import ImageError
from core.limits import LimitExceeded, TenantGone
from core.submit import SubmitError, SubmitUnavailable

log = logging.getLogger("nexusgen.api")

# An outage of a backing service is not the client's fault and not ours to hide: 503, retry shortly.
RETRY_AFTER_S = 5

DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}

# The OpenAPI description of every error answer (registered as apiflask's error schemas).
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "details": {}},
        }
    },
}


def fail(status: int, code: str, message: str, details: Any = None) -> NoReturn:
    """Stop the request with an error answer."""
    raise HTTPError(status, message, detail=details, extra_data={"code": code})


def error_response(status: int, code: str, message: str, details: Any = None) -> Response:
    response = jsonify({"error": {"code": code, "message": message, "details": details}})
    response.status_code = status
    return response


def unavailable(code: str, message: str) -> Response:
    """503 with Retry-After: a backing service (database, storage, broker) does not answer."""
    response = error_response(503, code, message)
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def register_error_handlers(app: APIFlask) -> None:
    """Every error our code or a library raises answers our error object: 503s, 401/409/422s, then HTTP."""
    _register_infrastructure(app)
    _register_client_errors(app)
    _register_http_errors(app)


def _register_infrastructure(app: APIFlask) -> None:
    """An outage of a backing service is a 503 with Retry-After and a code that names the service."""

    @app.errorhandler(OperationalError)
    @app.errorhandler(InterfaceError)
    def _database_down(error: Exception) -> Response:
        log.warning("database unavailable: %s", str(error).splitlines()[0][:300])
        return unavailable("database_unavailable", "the database is unavailable; retry shortly")

    @app.errorhandler(PoolTimeout)
    def _database_busy(error: Exception) -> Response:
        log.warning("no free database connection: %s", str(error).splitlines()[0][:300])
        return unavailable(
            "database_busy", "every database connection of this process is in use; retry shortly"
        )

    @app.errorhandler(MinioException)
    @app.errorhandler(Urllib3Error)
    def _storage_down(error: Exception) -> Response:
        log.warning("object storage unavailable: %s", str(error)[:300])
        return unavailable("storage_unavailable", "object storage is unavailable; retry shortly")

    @app.errorhandler(BrokerError)
    @app.errorhandler(KombuError)
    def _broker_down(error: Exception) -> Response:
        log.warning("broker unavailable: %s", str(error)[:300])
        return unavailable("broker_unavailable", "the message broker is unavailable; retry shortly")

    @app.errorhandler(SubmitUnavailable)
    def _submit_unavailable(error: SubmitUnavailable) -> Response:
        log.warning("submission check unavailable: %s", error.message)
        return unavailable(error.code, error.message)


def _register_client_errors(app: APIFlask) -> None:
    """What the request got wrong, found below the HTTP layer: the validators, the limits, the database."""

    def _tenant_gone() -> Response:
        # The key's tenant was removed while its lookup was cached: the key no longer exists.
        from api.auth import clear_cache

        clear_cache()
        response = error_response(401, "unauthorized", "this API key's tenant no longer exists")
        response.headers["WWW-Authenticate"] = 'Bearer realm="nexusgen"'
        return response

    @app.errorhandler(TenantGone)
    def _gone(error: TenantGone) -> Response:
        return _tenant_gone()

    @app.errorhandler(IntegrityError)
    def _integrity(error: IntegrityError) -> Response:
        # the job's tenant is gone: a foreign key's message, or the jobs' reference check (migration 0009)
        if "tenant_id" in str(error.orig) or 'reference to "tenants"' in str(error.orig):
            return _tenant_gone()
        return error_response(409, "conflict", "the request conflicts with the current state; retry it")

    @app.errorhandler(SubmitError)
    def _submit_error(error: SubmitError) -> Response:
        return error_response(error.status, error.code, error.message, error.details)

    @app.errorhandler(LimitExceeded)
    def _limit_exceeded(error: LimitExceeded) -> Response:
        response = error_response(429, error.code, error.message, error.details)
        response.headers.update(error.headers)
        return response

    @app.errorhandler(ImageError)
    def _image_error(error: ImageError) -> Response:
        return error_response(422, error.code, error.message)

    @app.errorhandler(DataError)
    def _data_error(error: DataError) -> Response:
        # A last line of defence: input the validators let through but Postgres refused (bad encoding, a
        # value out of a column's range) is the client's, not a server failure.
        return error_response(422, "invalid_input", "the database refused a value of this request")

    @app.errorhandler(IdempotencyConflict)
    def _idempotency_conflict(error: IdempotencyConflict) -> Response:
        return error_response(422, "idempotency_conflict", str(error))


def _register_http_errors(app: APIFlask) -> None:
    """apiflask's own errors (routing, method, schema validation, abort) carry our code and headers."""

    @app.error_processor
    def _apiflask_error(error: HTTPError) -> Response:
        code = (error.extra_data or {}).get("code") or DEFAULT_CODES.get(error.status_code, "error")
        details = error.detail or None
        response = error_response(error.status_code, code, str(error.message), details)
        for name, value in Headers(error.headers or {}).items():
            response.headers[name] = value
        return response
