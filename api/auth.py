"""Bearer API keys: the key's sha256 is looked up, its scopes become roles (admin implies every scope)."""

from __future__ import annotations

import threading
import time

from apiflask import HTTPError, HTTPTokenAuth
from flask import Response

from api.context import services
from api.errors import DEFAULT_CODES, error_response
from core.auth import SCOPES, Principal, authenticate, hash_key

auth = HTTPTokenAuth(scheme="Bearer", description="An API key made with `nexusgen key create --tenant NAME`.")

# A short in-process cache of key lookups keeps reads cheap; a revoked key stops working within the TTL.
_CACHE_TTL_S = 10.0
_cache: dict[str, tuple[float, Principal]] = {}
_cache_lock = threading.Lock()


@auth.verify_token
def _verify(token: str) -> Principal | None:
    if not token:
        return None
    digest = hash_key(token)
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(digest)
    if hit is not None and hit[0] > now:
        return hit[1]
    with services().reader.connect() as conn:
        principal = authenticate(conn, token)
    if principal is not None:  # unknown keys are not cached: a key created a moment later must work
        with _cache_lock:
            if len(_cache) > 10_000:
                _cache.clear()
            _cache[digest] = (now + _CACHE_TTL_S, principal)
    return principal


@auth.get_user_roles
def _roles(principal: Principal) -> list[str]:
    return list(SCOPES) if "admin" in principal.scopes else sorted(principal.scopes)


@auth.error_processor
def _auth_error(error: HTTPError) -> Response:
    if error.status_code == 401:
        message = "a valid API key is required: Authorization: Bearer <key>"
    else:
        message = "this API key does not have the scope this endpoint needs"
    response = error_response(error.status_code, DEFAULT_CODES.get(error.status_code, "error"), message)
    if error.status_code == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="nexusgen"'
    return response


def current_principal() -> Principal:
    principal = auth.current_user
    if not isinstance(principal, Principal):  # only reachable if a view forgot @auth_required
        raise RuntimeError("no authenticated principal in this request")
    return principal


def clear_cache() -> None:
    """Forget cached key lookups (tests that revoke keys)."""
    with _cache_lock:
        _cache.clear()
