"""Create work under an optional Idempotency-Key: replay the first answer, refuse a changed body."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Response, jsonify, request
from sqlalchemy import Connection

from api.context import services
from api.errors import fail
from core import idempotency


@dataclass
class Created:
    """What a creating handler produced: the answer, and the wake-ups to publish after the commit."""

    status: int
    body: dict[str, Any]
    wakeups: set[tuple[str, str]] = field(default_factory=set)
    headers: dict[str, str] = field(default_factory=dict)


def create_idempotently(
    tenant_id: str, fingerprint: bytes, work: Callable[[Connection], Created]
) -> Response:
    """Run `work` in one transaction with the key row inserted first; publish wake-ups after the commit.

    `fingerprint` is what makes two requests the same (the raw body, or the file of an upload).
    """
    svc = services()
    key = request.headers.get("Idempotency-Key")
    if key is not None and not idempotency.valid_key(key):
        fail(400, "invalid_idempotency_key", "Idempotency-Key must have 1 to 255 printable characters")
    with svc.engine.begin() as conn:
        if key is not None:
            req_hash = idempotency.request_hash(request.method, request.path, fingerprint)
            stored = idempotency.begin(conn, tenant_id, key, req_hash, svc.settings.idempotency_ttl_s)
            if stored is not None:
                response = jsonify(stored.body)
                response.status_code = stored.status
                response.headers["Idempotent-Replayed"] = "true"
                return response
        created = work(conn)
        if key is not None:
            idempotency.finish(conn, tenant_id, key, created.status, created.body)
    svc.wake(created.wakeups)
    response = jsonify(created.body)
    response.status_code = created.status
    response.headers.update(created.headers)
    return response
