"""Create work under an optional Idempotency-Key: replay the first answer, refuse a changed body."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flask import Response, jsonify, request
from sqlalchemy import Connection

from api.context import services
from api.errors import fail
from core import idempotency

T = TypeVar("T")


@dataclass
class Created:
    """What a creating handler produced: the answer, and the wake-ups to publish after the commit."""

    status: int
    body: dict[str, Any]
    wakeups: set[tuple[str, str]] = field(default_factory=set)
    headers: dict[str, str] = field(default_factory=dict)


def create_idempotently(
    tenant_id: str,
    fingerprint: bytes,
    prepare: Callable[[], T],
    work: Callable[[Connection, T], Created],
    discard: Callable[[T], None],
) -> Response:
    """`prepare` outside any transaction, then `work` in one transaction with the key row inserted first;
    publish wake-ups after the commit.

    `prepare` does the request's network I/O (validation with its webhook DNS checks, object uploads), so
    no transaction holds a row and a pooled connection while it waits. A key already answered replays
    before anything is prepared. What was prepared for a request that then fails, or that turns out a
    replay (a concurrent request with its key committed first), is handed to `discard` once the
    transaction has ended: uploaded objects are deleted, none outlives a request that created nothing.
    `fingerprint` is what makes two requests the same (the raw body, or the file of an upload).
    """
    svc = services()
    key = request.headers.get("Idempotency-Key")
    if key is not None and not idempotency.valid_key(key):
        fail(400, "invalid_idempotency_key", "Idempotency-Key must have 1 to 255 printable characters")
    ttl_s = svc.settings.idempotency_ttl_s
    req_hash = ""
    if key is not None:
        req_hash = idempotency.request_hash(request.method, request.path, fingerprint)
        with svc.engine.connect() as conn:
            stored = idempotency.lookup(conn, tenant_id, key, req_hash, ttl_s)
        if stored is not None:
            return _replay(stored)
    prepared = prepare()
    try:
        with svc.engine.begin() as conn:
            stored = None if key is None else idempotency.begin(conn, tenant_id, key, req_hash, ttl_s)
            if stored is None:
                created = work(conn, prepared)
                if key is not None:
                    idempotency.finish(conn, tenant_id, key, created.status, created.body)
    except BaseException:
        discard(prepared)
        raise
    if stored is not None:
        discard(prepared)
        return _replay(stored)
    svc.wake(created.wakeups)
    response = jsonify(created.body)
    response.status_code = created.status
    response.headers.update(created.headers)
    return response


def _replay(stored: idempotency.StoredResponse) -> Response:
    response = jsonify(stored.body)
    response.status_code = stored.status
    response.headers["Idempotent-Replayed"] = "true"
    return response
