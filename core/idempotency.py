"""Idempotency-Key handling: the key row is inserted first, in the same transaction as the work it guards.

A key already answered is looked up first (`lookup`), before the request's work is prepared. A second
request with the same key that gets past that waits on the first one's uncommitted row (unique primary
key), then finds the stored response and replays it, so concurrent retries never create work twice. A failed
request rolls back its key row with everything else, so the client may retry.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, RowMapping, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert

from core.schema import idempotency_keys

MAX_KEY_CHARS = 255


class IdempotencyConflict(ValueError):
    """The key was used before with another request body."""


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: Any


def request_hash(method: str, path: str, body: bytes) -> str:
    """What makes two requests "the same": method, path and body bytes."""
    digest = hashlib.sha256()
    for part in (method.upper().encode(), b"\0", path.encode(), b"\0", body):
        digest.update(part)
    return digest.hexdigest()


def valid_key(key: str) -> bool:
    return 1 <= len(key) <= MAX_KEY_CHARS and key.isprintable()


def lookup(conn: Connection, tenant_id: str, key: str, req_hash: str, ttl_s: int) -> StoredResponse | None:
    """The stored response of a key already answered (None: not yet, or expired), read before any work
    is prepared, so that a replay does no validation, DNS check or upload. Raises IdempotencyConflict when
    the key was used with a different request."""
    row = (
        conn.execute(
            select(idempotency_keys).where(
                idempotency_keys.c.tenant_id == tenant_id,
                idempotency_keys.c.key == key,
                idempotency_keys.c.created_at >= func.now() - timedelta(seconds=ttl_s),
            )
        )
        .mappings()
        .first()
    )
    return None if row is None else _stored(row, req_hash)


def begin(conn: Connection, tenant_id: str, key: str, req_hash: str, ttl_s: int) -> StoredResponse | None:
    """Claim the key for this request (None: go on) or return the first request's response to replay.

    Raises IdempotencyConflict when the key was used with a different request.
    """
    conn.execute(
        delete(idempotency_keys).where(
            idempotency_keys.c.tenant_id == tenant_id,
            idempotency_keys.c.key == key,
            idempotency_keys.c.created_at < func.now() - timedelta(seconds=ttl_s),
        )
    )
    inserted = conn.execute(
        insert(idempotency_keys)
        .values(tenant_id=tenant_id, key=key, request_hash=req_hash)
        .on_conflict_do_nothing()
        .returning(idempotency_keys.c.key)
    ).first()
    if inserted is not None:
        return None
    row = (
        conn.execute(
            select(idempotency_keys).where(
                idempotency_keys.c.tenant_id == tenant_id, idempotency_keys.c.key == key
            )
        )
        .mappings()
        .first()
    )
    if row is None:  # expired and purged between the two statements: treat as new on the client's retry
        raise IdempotencyConflict("the idempotency key expired while this request was served; retry")
    return _stored(row, req_hash)


def _stored(row: RowMapping, req_hash: str) -> StoredResponse:
    if row["request_hash"] != req_hash:
        raise IdempotencyConflict("this Idempotency-Key was used with a different request")
    return StoredResponse(status=int(row["response_status"]), body=row["response_body"])


def finish(conn: Connection, tenant_id: str, key: str, status: int, body: Any) -> None:
    """Store the response to replay; call in the same transaction as begin() before it commits."""
    conn.execute(
        update(idempotency_keys)
        .where(idempotency_keys.c.tenant_id == tenant_id, idempotency_keys.c.key == key)
        .values(response_status=status, response_body=body)
    )


def purge_expired(conn: Connection, ttl_s: int) -> int:
    """Delete keys older than the retention (called by the sweeper); return how many went."""
    result = conn.execute(
        delete(idempotency_keys).where(idempotency_keys.c.created_at < func.now() - timedelta(seconds=ttl_s))
    )
    return int(result.rowcount or 0)
