"""Result retention: results and inputs are kept for a TTL after their last use, then their objects go.

A result is kept `result_ttl_s` (the tenant's override, else NEXUSGEN_RESULT_TTL_S) after its job
finished; an upload the same long after it was stored or last named by a job, and never while a queued or
running job uses it. Expiry is two steps, so object storage is never called inside a transaction: `mark`
sets `expired_at` (the API answers 410 from then on), `purge` deletes the objects of marked rows and
clears their `object_key`; a failed delete is retried by the next sweep, so storage cannot grow for good.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import urllib3.exceptions
from minio.error import MinioException
from sqlalchemy import ColumnElement, Connection, Engine, Table, exists, func, select, update

from core.schema import jobs, results, tenants, uploads
from core.storage import Storage

log = logging.getLogger(__name__)

CHUNK = 500  # rows per statement
ACTIVE = ("queued", "running")


def retained_until(tenant_id: Any, default_ttl_s: float) -> ColumnElement[Any]:
    """SQL: now() plus the tenant's retention (its override, else `default_ttl_s`)."""
    override = select(tenants.c.result_ttl_s).where(tenants.c.id == tenant_id).scalar_subquery()
    return func.now() + func.make_interval(0, 0, 0, 0, 0, 0, func.coalesce(override, default_ttl_s))


def keep_uploads(conn: Connection, tenant_id: str, upload_ids: set[str], default_ttl_s: float) -> set[str]:
    """Push back the expiry of the tenant's uploads that new jobs name; return the ids still retained.

    The row update also orders this against `mark_expired`: an upload is either kept for the new job or
    already expired (and then refused), never deleted under it.
    """
    if not upload_ids:
        return set()
    rows = conn.execute(
        update(uploads)
        .where(
            uploads.c.tenant_id == tenant_id,
            uploads.c.id.in_(sorted(upload_ids)),
            uploads.c.expired_at.is_(None),
        )
        .values(expires_at=func.greatest(uploads.c.expires_at, retained_until(tenant_id, default_ttl_s)))
        .returning(uploads.c.id)
    ).scalars()
    return set(rows)


def _due(table: Table) -> ColumnElement[bool]:
    return table.c.expired_at.is_(None) & (table.c.expires_at < func.now())


def mark_expired(conn: Connection, limit: int = CHUNK) -> tuple[int, int]:
    """Mark up to `limit` due results and unused due uploads expired; return (results, uploads)."""
    due_results = (
        select(results.c.id)
        .where(_due(results))
        .order_by(results.c.expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    n_results = conn.execute(
        update(results).where(results.c.id.in_(due_results)).values(expired_at=func.now(), text=None)
    ).rowcount
    in_use = exists().where(jobs.c.upload_id == uploads.c.id, jobs.c.status.in_(ACTIVE))
    due_uploads = (
        select(uploads.c.id)
        .where(_due(uploads), ~in_use)
        .order_by(uploads.c.expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    n_uploads = conn.execute(
        update(uploads).where(uploads.c.id.in_(due_uploads), _due(uploads)).values(expired_at=func.now())
    ).rowcount
    return int(n_results or 0), int(n_uploads or 0)


def purge(engine: Engine, storage: Storage, table: Table, limit: int = CHUNK) -> int:
    """Delete the objects of up to `limit` expired rows of `table` (results or uploads); return how many."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(table.c.id, table.c.object_key)
            .where(table.c.expired_at.is_not(None), table.c.object_key.is_not(None))
            .limit(limit)
        ).all()
    done = []
    for row_id, key in rows:
        try:
            storage.delete(key)  # deleting a missing key succeeds: a repeated purge is harmless
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:  # the next sweep retries
            log.warning("retention: could not delete %s (%s); retried next sweep", key, exc)
            continue
        done.append(row_id)
    if done:
        with engine.begin() as conn:
            conn.execute(update(table).where(table.c.id.in_(done)).values(object_key=None))
    return len(done)


def expire(engine: Engine, storage: Storage, budget_s: float = 10.0) -> dict[str, int]:
    """One retention round (the sweeper): mark, then purge, chunk by chunk for at most `budget_s`."""
    deadline = time.monotonic() + budget_s
    counts = {"results_expired": 0, "uploads_expired": 0, "objects_deleted": 0}
    while True:
        with engine.begin() as conn:
            n_results, n_uploads = mark_expired(conn)
        deleted = purge(engine, storage, results) + purge(engine, storage, uploads)
        counts["results_expired"] += n_results
        counts["uploads_expired"] += n_uploads
        counts["objects_deleted"] += deleted
        if (n_results < CHUNK and n_uploads < CHUNK and deleted < CHUNK) or time.monotonic() > deadline:
            return counts
