"""Result retention: results and inputs are kept for a TTL after their last use, then their objects go.

A result is kept `result_ttl_s` (the tenant's override, else NEXUSGEN_RESULT_TTL_S) after its job
finished; an upload the same long after it was stored or last named by a job, and never while a queued or
running job uses it. Expiry is two steps, so object storage is never called inside a transaction: `mark`
sets `expired_at` (the API answers 410 from then on), `purge` deletes the objects of marked rows and
clears their `object_key`; a failed delete is retried by the next sweep, so storage cannot grow for good.

Orphans: an input image is stored before the transaction that inserts its row (core.pending_uploads), so
an API process that dies in between leaves an object no row names. `collect_orphans` walks the bucket a few
listing pages per sweep, from where the last sweep stopped, and deletes the input objects that have no row
and are older than NEXUSGEN_ORPHAN_GRACE_S (far longer than any request takes between its put and commit).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import urllib3.exceptions
from minio.error import MinioException
from sqlalchemy import ColumnElement, Connection, Engine, Table, exists, func, select, update

from core.schema import jobs, results, tenants, uploads
from core.storage import KEY_ROOT, UPLOADS, Storage

log = logging.getLogger(__name__)

CHUNK = 500  # rows per statement
ORPHAN_PAGE = 1000  # keys per listing request (S3's page size)
ORPHAN_PAGES = 4  # listing requests per sweep: its work is bounded, whatever the size of the bucket
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


@dataclass
class OrphanWalk:
    """Where the orphan walk resumes: the last key it looked at ("": the start of the bucket).

    Held by the sweeping process between sweeps; a restarted process starts over, which only repeats work.
    """

    start_after: str = ""


WALK = OrphanWalk()  # the sweeper's


def _next_keys(storage: Storage, walk: OrphanWalk, pages: int, page_size: int) -> list[tuple[str, datetime]]:
    """The input objects (key, last modified) of up to `pages` listing requests from where `walk` stands,
    which it then passes. Other kinds (results: tenants/<t>/jobs/...) are jumped over, not listed, one
    request per tenant: a tenant's millions of results do not hold the walk up. At the end of the bucket
    the walk starts over."""
    found: list[tuple[str, datetime]] = []
    for _ in range(pages):
        page = storage.list_page(KEY_ROOT, walk.start_after, page_size)
        for key, modified in page:
            walk.start_after = key
            parts = key.split("/")
            if len(parts) > 3 and parts[2] != UPLOADS:  # past every key under tenants/<t>/<kind>/
                walk.start_after = "/".join(parts[:3]) + chr(ord("/") + 1)
                break
            if len(parts) == 4 and parts[3] and modified is not None:
                found.append((key, modified))
        else:
            if len(page) < page_size:
                walk.start_after = ""
                break
    return found


def collect_orphans(
    engine: Engine,
    storage: Storage,
    grace_s: float,
    walk: OrphanWalk = WALK,
    pages: int = ORPHAN_PAGES,
    page_size: int = ORPHAN_PAGE,
) -> int:
    """Delete the input objects of the walk's next pages that are older than `grace_s` and that no upload
    row names; return how many. A failed delete is logged; the next pass over the bucket retries it."""
    cutoff = datetime.now(UTC) - timedelta(seconds=grace_s)
    listed = _next_keys(storage, walk, pages, page_size)
    old = {key.rsplit("/", 1)[1]: key for key, modified in listed if modified < cutoff}
    if not old:
        return 0
    with engine.connect() as conn:  # by primary key: an upload id is unique across tenants
        named = set(conn.execute(select(uploads.c.id).where(uploads.c.id.in_(sorted(old)))).scalars())
    orphans = [key for upload_id, key in old.items() if upload_id not in named]
    if not orphans:
        return 0
    try:
        failed = storage.delete_many(orphans)
    except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
        log.warning(
            "retention: could not delete %d orphaned inputs (%s); retried next pass", len(orphans), exc
        )
        return 0
    if failed:
        log.warning("retention: could not delete %d orphaned inputs, e.g. %s", len(failed), failed[0])
    log.info("retention: deleted %d orphaned inputs (no upload row, older than %s s)", len(orphans), grace_s)
    return len(orphans) - len(failed)


def expire(
    engine: Engine, storage: Storage, budget_s: float = 10.0, orphan_grace_s: float | None = None
) -> dict[str, int]:
    """One retention round (the sweeper): mark, then purge, chunk by chunk for at most `budget_s`; then,
    given `orphan_grace_s`, one bounded step of the orphan walk."""
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
            break
    if orphan_grace_s is not None:
        counts["orphans_deleted"] = collect_orphans(engine, storage, orphan_grace_s)
    return counts
