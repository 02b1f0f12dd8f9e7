"""Job counts without counting job rows: sums over `job_counts`, which triggers on `jobs` keep exact.

Every statement that inserts, deletes or changes the status of jobs appends one delta row per changed
key in its own transaction, so a committed count is always exact and no writer waits on a counter row.
The sweeper folds the deltas (`compact_counts`), so reads stay a few thousand rows at any depth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, func, select, text

from core.schema import job_counts

_COMPACT_LOCK = 0x6E657863  # "nexc": one compaction at a time


@dataclass(frozen=True)
class Group:
    """Queued jobs of one tenant that a claim takes together: same task, bucket and priority."""

    task: str
    bucket: str
    priority: int
    tenant_id: str
    queued: int


def queued_groups(conn: Connection, tasks: Sequence[str], bucket: str | None = None) -> list[Group]:
    """Every (task, bucket, priority, tenant) with queued jobs, most urgent priority first."""
    c = job_counts.c
    q = select(c.task, c.bucket, c.priority, c.tenant_id, func.sum(c.n)).where(
        c.status == "queued", c.task.in_(list(tasks))
    )
    if bucket is not None:
        q = q.where(c.bucket == bucket)
    rows = conn.execute(
        q.group_by(c.task, c.bucket, c.priority, c.tenant_id)
        .having(func.sum(c.n) > 0)
        .order_by(c.priority.desc(), c.task, c.bucket, c.tenant_id)
    ).all()
    return [Group(task, bucket, int(priority), tenant, int(n)) for task, bucket, priority, tenant, n in rows]


def queued_tasks(conn: Connection) -> list[str]:
    """The task kinds that have queued jobs."""
    c = job_counts.c
    return list(
        conn.execute(
            select(c.task).where(c.status == "queued").group_by(c.task).having(func.sum(c.n) > 0)
        ).scalars()
    )


def counts_by_status(conn: Connection) -> dict[tuple[str, str], int]:
    """{(task, status): jobs} over every tenant, for the statuses that have jobs."""
    c = job_counts.c
    rows = conn.execute(
        select(c.task, c.status, func.sum(c.n)).group_by(c.task, c.status).having(func.sum(c.n) != 0)
    ).all()
    return {(task, status): int(n) for task, status, n in rows}


def queue_depths(conn: Connection) -> dict[tuple[str, str, int], int]:
    """{(task, bucket, priority): queued jobs} for the non-empty queues."""
    c = job_counts.c
    rows = conn.execute(
        select(c.task, c.bucket, c.priority, func.sum(c.n))
        .where(c.status == "queued")
        .group_by(c.task, c.bucket, c.priority)
        .having(func.sum(c.n) > 0)
    ).all()
    return {(task, bucket, int(priority)): int(n) for task, bucket, priority, n in rows}


def compact_counts(conn: Connection) -> int:
    """Fold every key's delta rows into one row (dropping keys that sum to zero); returns rows removed."""
    if not conn.execute(text("SELECT pg_try_advisory_xact_lock(:id)"), {"id": _COMPACT_LOCK}).scalar():
        return 0  # another sweeper is at it
    # Rows appended after this statement's snapshot are neither deleted nor summed: totals never move.
    removed = conn.execute(
        text(
            """
            WITH keys AS (
                SELECT tenant_id, task, status, bucket, priority FROM job_counts
                GROUP BY 1, 2, 3, 4, 5 HAVING count(*) > 1 OR sum(n) = 0
            ), gone AS (
                DELETE FROM job_counts AS c USING keys AS k
                WHERE (c.tenant_id, c.task, c.status, c.bucket, c.priority)
                    = (k.tenant_id, k.task, k.status, k.bucket, k.priority)
                RETURNING c.tenant_id, c.task, c.status, c.bucket, c.priority, c.n
            ), kept AS (
                INSERT INTO job_counts (tenant_id, task, status, bucket, priority, n)
                SELECT tenant_id, task, status, bucket, priority, sum(n) FROM gone
                GROUP BY 1, 2, 3, 4, 5 HAVING sum(n) <> 0
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM gone) - (SELECT count(*) FROM kept)
            """
        )
    ).scalar_one()
    return int(removed)
