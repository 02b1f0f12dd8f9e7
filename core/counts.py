"""Job counts without counting job rows: sums over `job_counts`, which triggers on `jobs` keep exact.

Every statement that inserts, deletes or changes the status of jobs appends one delta row per changed
key in its own transaction, so a committed count is always exact and no writer waits on a counter row.
The sweeper folds the deltas (`compact_counts`), so reads stay a few thousand rows at any depth.
"""

from __future__ import annotations

from sqlalchemy import Connection, func, select, text

from core.schema import job_counts

_COMPACT_LOCK = 0x6E657863  # "nexc": one compaction at a time


def queued_tasks(conn: Connection) -> list[str]:
    """The task kinds that have queued jobs."""
    c = job_counts.c
    return list(
        conn.execute(
            select(c.task).where(c.status == "queued").group_by(c.task).having(func.sum(c.n) > 0)
        ).scalars()
    )


def tally(conn: Connection) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str, int], int]]:
    """One read of the counters: ({(task, status): jobs}, {(task, bucket, priority): queued jobs}),
    both without zero entries."""
    c = job_counts.c
    rows = conn.execute(
        select(c.task, c.status, c.bucket, c.priority, func.sum(c.n))
        .group_by(c.task, c.status, c.bucket, c.priority)
        .having(func.sum(c.n) != 0)
    ).all()
    by_status: dict[tuple[str, str], int] = {}
    depths: dict[tuple[str, str, int], int] = {}
    for task, status, bucket, priority, n in rows:
        by_status[(task, status)] = by_status.get((task, status), 0) + int(n)
        if status == "queued":
            depths[(task, bucket, int(priority))] = int(n)
    return {k: v for k, v in by_status.items() if v}, depths


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
