"""Job and delivery counts without counting their rows: sums over counter tables that triggers keep exact.

Every statement that inserts, deletes or changes the status of jobs appends one delta row per changed
key of `job_counts` in its own transaction, and that append appends the changed keys of its rollups
(`queue_tenants`: queued jobs per task, priority and tenant; `queue_buckets`: per task and bucket); the
same goes for webhook deliveries and `delivery_counts`. So a committed count is always exact and no
writer waits on a counter row. The sweeper folds the deltas (`compact_counts`), so reads stay a few
thousand rows (job_counts) or a few dozen (the rollups) at any depth.
"""

from __future__ import annotations

from sqlalchemy import Connection, func, select, text

from core.schema import delivery_counts, job_counts, queue_buckets, queue_tenants

_COMPACT_LOCK = 0x6E657863  # "nexc": one compaction at a time
# Each counter table and its key.
_KEYS = {
    "job_counts": "tenant_id, task, status, bucket, priority",
    "queue_tenants": "task, priority, tenant_id",
    "queue_buckets": "task, bucket",
    "delivery_counts": "status",
}


def queued_tasks(conn: Connection) -> list[str]:
    """The task kinds that have queued jobs."""
    c = queue_buckets.c
    return list(conn.execute(select(c.task).group_by(c.task).having(func.sum(c.n) > 0)).scalars())


def bucket_depths(conn: Connection, task: str) -> dict[str, int]:
    """Queued jobs of `task` per bucket (buckets without any are absent)."""
    c = queue_buckets.c
    rows = conn.execute(
        select(c.bucket, func.sum(c.n)).where(c.task == task).group_by(c.bucket).having(func.sum(c.n) > 0)
    ).all()
    return {bucket: int(n) for bucket, n in rows}


def tenant_queued(conn: Connection, tenant_id: str) -> int:
    """The tenant's queued jobs, all tasks and priorities."""
    c = queue_tenants.c
    return int(
        conn.execute(select(func.coalesce(func.sum(c.n), 0)).where(c.tenant_id == tenant_id)).scalar_one()
    )


def deliveries_by_status(conn: Connection) -> dict[str, int]:
    """Webhook deliveries per status (statuses without any are absent)."""
    c = delivery_counts.c
    rows = conn.execute(select(c.status, func.sum(c.n)).group_by(c.status).having(func.sum(c.n) != 0)).all()
    return {status: int(n) for status, n in rows}


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
    """Fold every key's delta rows of every counter table into one row (dropping keys that sum to zero);
    returns the rows removed."""
    if not conn.execute(text("SELECT pg_try_advisory_xact_lock(:id)"), {"id": _COMPACT_LOCK}).scalar():
        return 0  # another sweeper is at it
    # Folding keeps every key's sum, so the rollups of job_counts need no rows for it (migration 0008).
    conn.execute(text("SELECT set_config('nexusgen.folding', 'on', true)"))
    removed = _fold(conn, "job_counts", _KEYS["job_counts"])
    conn.execute(text("SELECT set_config('nexusgen.folding', 'off', true)"))
    return removed + sum(_fold(conn, table, key) for table, key in _KEYS.items() if table != "job_counts")


def _fold(conn: Connection, table: str, key: str) -> int:
    # Rows appended after this statement's snapshot are neither deleted nor summed: totals never move.
    keys = ", ".join(f"c.{k}" for k in key.split(", "))
    removed = conn.execute(
        text(
            f"""
            WITH keys AS (
                SELECT {key} FROM {table} GROUP BY {key} HAVING count(*) > 1 OR sum(n) = 0
            ), gone AS (
                DELETE FROM {table} AS c USING keys AS k
                WHERE ({keys}) = ({", ".join(f"k.{k}" for k in key.split(", "))})
                RETURNING {keys}, c.n
            ), kept AS (
                INSERT INTO {table} ({key}, n)
                SELECT {key}, sum(n) FROM gone GROUP BY {key} HAVING sum(n) <> 0
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM gone) - (SELECT count(*) FROM kept)
            """
        )
    ).scalar_one()
    return int(removed)
