"""Job events: every state a job passes through (status, stage, step k/N), appended by the transition
that reaches it, so a live stream can replay them in order after any Last-Event-ID.

A new job's `queued` state is not logged (bulk ingestion stays one COPY); streams start from the job row.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Insert,
    RowMapping,
    String,
    case,
    func,
    literal_column,
    select,
)

from core.records import Job, JobStatus
from core.schema import job_events, jobs

FIELDS = ("status", "stage", "step", "total_steps")
# 'queued' written into the SQL, not bound: a prepared statement's generic plan can then use the partial
# indexes on queued jobs (core.schema), and Postgres stops planning the statement again at each execution.
IS_QUEUED = literal_column(f"'{JobStatus.QUEUED}'", String)


def log_states(conn: Connection, changed: Sequence[Job]) -> None:
    """Append the current state of each job (as a transition's RETURNING gave it)."""
    if changed:
        conn.execute(
            job_events.insert(),
            [
                {
                    "job_id": job.id,
                    "batch_id": job.batch_id,
                    "tenant_id": job.tenant_id,
                    **{f: getattr(job, f) for f in FIELDS},
                }
                for job in changed
            ],
        )


def log_claimed(claimed: Any) -> Insert:
    """The states of the rows a claiming statement returns (`claimed`, a CTE of it), appended by that same
    statement in claim order: a claim costs no second round trip."""
    return job_events.insert().from_select(
        ["job_id", "batch_id", "tenant_id", *FIELDS],
        select(
            claimed.c.id, claimed.c.batch_id, claimed.c.tenant_id, *(claimed.c[f] for f in FIELDS)
        ).order_by(claimed.c.created_at, claimed.c.id),
    )


def events_after(
    conn: Connection,
    after: int,
    *,
    job_id: str | None = None,
    batch_id: str | None = None,
    older_than_s: float = 0.0,
    limit: int = 500,
) -> list[RowMapping]:
    """The events of one job or one batch with an id above `after`, oldest first (only those at least
    `older_than_s` old, when given)."""
    cond = job_events.c.job_id == job_id if job_id is not None else job_events.c.batch_id == batch_id
    query = select(job_events).where(cond, job_events.c.id > after)
    if older_than_s > 0:
        query = query.where(job_events.c.created_at < func.now() - timedelta(seconds=older_than_s))
    return list(conn.execute(query.order_by(job_events.c.id).limit(limit)).mappings())


def last_event_id(conn: Connection) -> int:
    """The newest event id (0 when there is none); an index probe."""
    return int(conn.execute(select(func.coalesce(func.max(job_events.c.id), 0))).scalar_one())


def touched_since(conn: Connection, after: int, upto: int) -> set[str]:
    """The job and batch ids with events in (after, upto]."""
    rows = conn.execute(
        select(job_events.c.job_id, job_events.c.batch_id)
        .where(job_events.c.id > after, job_events.c.id <= upto)
        .distinct()
    ).all()
    return {r.job_id for r in rows} | {r.batch_id for r in rows if r.batch_id is not None}


# Own jobs ahead of a queued job (same task, tenant and priority) are counted up to this many, and so are
# those behind it; beyond both, the rank is interpolated (docs/queue_position.md).
EXACT_UP_TO = 1000
_N = EXACT_UP_TO
_OWN = (
    "own.status = 'queued' AND own.task = jobs.task AND own.tenant_id = jobs.tenant_id"
    " AND own.priority = jobs.priority"
)
# When an id was made: `job_` + 12 hex digits of milliseconds + 4 of sequence (core.ids); NULL otherwise.
_MADE = "CASE WHEN {0} ~ '^job_[0-9a-f]{{24}}$' THEN ('x' || substr({0}, 5, 16))::bit(64)::bigint::float8 END"


def _bounded(direction: str) -> str:
    """Own queued jobs before ('<') or after ('>') the outer job in claim order, counted up to _N: one
    range of ix_jobs_queue_tenant, read from the job outwards (the order keeps the planner on the index)."""
    order = "DESC" if direction == "<" else "ASC"
    return (
        f"(SELECT count(*) AS n FROM (SELECT 1 FROM jobs AS own WHERE {_OWN}"
        f" AND (own.created_at, own.id) {direction} (jobs.created_at, jobs.id)"
        f" ORDER BY own.created_at {order}, own.id {order} LIMIT {_N}) AS x)"
    )


def _end(order: str) -> str:
    """The id of the tenant's oldest ('ASC') or newest ('DESC') queued job of the task and priority."""
    return (
        f"(SELECT own.id FROM jobs AS own WHERE {_OWN}"
        f" ORDER BY own.created_at {order}, own.id {order} LIMIT 1)"
    )


# k: the outer job's tenant's queued jobs of its task and priority that go before it. Exact when fewer
# than _N are ahead, or fewer than _N behind (then k = the tenant's count from the rollup - 1 - behind);
# otherwise interpolated on when the ids were made between the tenant's oldest and newest such job.
_OWN_AHEAD = f"""CASE WHEN a.n < {_N} THEN a.n ELSE (
    SELECT CASE WHEN b.n < {_N} THEN greatest({_N}, mine.q - 1 - b.n)
        ELSE least(greatest({_N}, round((mine.q - 1) * coalesce(least(1.0, greatest(0.0,
                 ({_MADE.format("jobs.id")} - e.first) / nullif(e.last - e.first, 0))), 0.5))::bigint),
             greatest({_N}, mine.q - 1 - {_N})) END
    FROM {_bounded(">")} AS b,
         (SELECT CAST(coalesce(sum(n), 0) AS bigint) AS q FROM queue_tenants WHERE task = jobs.task
          AND priority = jobs.priority AND tenant_id = jobs.tenant_id) AS mine,
         (SELECT {_MADE.format("ends.first")} AS first, {_MADE.format("ends.last")} AS last
          FROM (SELECT {_end("ASC")} AS first, {_end("DESC")} AS last) AS ends) AS e
) END"""


def position_sql(batch: int) -> str:
    """The SQL of a queued job's estimated queue position, correlated to an outer `jobs` row (NULL-safe
    only for queued rows: the caller guards with status = 'queued'). `batch`: the jobs a claim takes
    (NEXUSGEN_MAX_BATCH). Costs the same at any depth: two bounded index ranges (up to _N entries each),
    two index probes, and the task's rows of the queue_tenants rollup (tenants x priorities).

    1 + H + k + sum over the other tenants t at the job's priority of min(q_t, B * (k div B + d_t)):
    H the task's queued jobs of higher priorities (they all go first), k the tenant's own jobs ahead, q_t
    another tenant's queued jobs at the priority, B the batch, and d_t 1 when t's turn comes before the
    job's tenant's (tenants with higher-priority work are served, so go to the back: first those without
    any, then by how many batches of it they have, then round-robin order). docs/queue_position.md
    derives it and states its error."""
    b, b1 = int(batch), int(batch) - 1
    assert b >= 1
    return f"""(SELECT CAST(1 + me.k + coalesce(sum(t.h), 0) + coalesce(sum(least(t.q, {b} * (me.k / {b}
        + CASE
        WHEN (t.h > 0, (t.h + {b1}) / {b}, coalesce(s.served_at, '-infinity'), t.tenant_id)
           < (me.h > 0, (me.h + {b1}) / {b}, me.served, jobs.tenant_id) THEN 1 ELSE 0 END)))
        FILTER (WHERE t.tenant_id <> jobs.tenant_id), 0) AS bigint)
    FROM (
        SELECT {_OWN_AHEAD} AS k,
            (SELECT CAST(coalesce(sum(n), 0) AS bigint) FROM queue_tenants WHERE task = jobs.task
             AND tenant_id = jobs.tenant_id AND priority > jobs.priority) AS h,
            coalesce((SELECT served_at FROM tenant_turns WHERE task = jobs.task
                      AND tenant_id = jobs.tenant_id), '-infinity') AS served
        FROM {_bounded("<")} AS a
    ) AS me LEFT JOIN (
        (SELECT tenant_id, CAST(coalesce(sum(n) FILTER (WHERE priority > jobs.priority), 0) AS bigint) AS h,
                CAST(coalesce(sum(n) FILTER (WHERE priority = jobs.priority), 0) AS bigint) AS q
         FROM queue_tenants WHERE task = jobs.task AND priority >= jobs.priority GROUP BY tenant_id) AS t
        LEFT JOIN tenant_turns AS s ON s.task = jobs.task AND s.tenant_id = t.tenant_id
    ) ON true
    GROUP BY me.k)"""


def position_column(batch: int) -> ColumnElement[int]:
    """A queued job's estimated position as a column of a statement over `jobs` (NULL for other jobs)."""
    return case((jobs.c.status == IS_QUEUED, literal_column(position_sql(batch), BigInteger)))


def queue_positions(conn: Connection, job_ids: Sequence[str], batch: int) -> dict[str, int]:
    """{job id: estimated queue position} for those of `job_ids` that are queued: one statement."""
    if not job_ids:
        return {}
    rows = conn.execute(
        select(jobs.c.id, position_column(batch)).where(
            jobs.c.id.in_(list(job_ids)), jobs.c.status == IS_QUEUED
        )
    ).all()
    return {job_id: int(position) for job_id, position in rows if position is not None}


def queue_position(conn: Connection, job: Job, batch: int) -> int | None:
    """An estimate for a queued job (None for any other): how many queued jobs of its task claims take
    before it, plus 1, under priorities and fair share (position_sql)."""
    if job.status is not JobStatus.QUEUED:
        return None
    return queue_positions(conn, [job.id], batch).get(job.id)


def purge_events(conn: Connection, older_than_s: float, limit: int = 5000) -> int:
    """Delete those of the `limit` oldest events (a bounded pkey scan; ids follow time) older than
    `older_than_s`; return how many went."""
    head = select(job_events.c.id, job_events.c.created_at).order_by(job_events.c.id).limit(limit).subquery()
    old = select(head.c.id).where(head.c.created_at < func.now() - timedelta(seconds=older_than_s))
    return int(
        conn.execute(job_events.delete().where(job_events.c.id.in_(old.scalar_subquery()))).rowcount or 0
    )
