"""Job events: every state a job passes through (status, stage, step k/N), appended by the transition
that reaches it, so a live stream can replay them in order after any Last-Event-ID.

A new job's `queued` state is not logged (bulk ingestion stays one COPY); streams start from the job row.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Insert,
    Integer,
    RowMapping,
    Select,
    String,
    and_,
    func,
    literal_column,
    or_,
    select,
)

from core.records import Job, JobStatus
from core.schema import job_events, jobs

FIELDS = ("status", "stage", "step", "total_steps")
POSITION_CAP = 100_000  # queue positions are counted up to this, then reported as this
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


def runs_before(
    task: Any, priority: Any, created_at: Any, job_id: Any, jobs_: Any = jobs
) -> ColumnElement[bool]:
    """The condition on `jobs_` rows (the table or an alias) for the queued jobs that priority-then-age
    order puts before a job of these values (plain values, or the columns of a correlated outer row)."""
    return and_(
        jobs_.c.status == IS_QUEUED,
        jobs_.c.task == task,
        or_(
            jobs_.c.priority > priority,
            and_(
                jobs_.c.priority == priority,
                or_(
                    jobs_.c.created_at < created_at,
                    and_(jobs_.c.created_at == created_at, jobs_.c.id < job_id),
                ),
            ),
        ),
    )


def count_ahead(condition: ColumnElement[bool], jobs_: Any = jobs, *, outer: Any = None) -> Select[int]:
    """1 + the number of `jobs_` rows meeting `condition`, counted up to POSITION_CAP; `outer`: the table
    of the enclosing statement the condition refers to (a correlated count)."""
    ahead = select(jobs_.c.id).where(condition).limit(literal_column(str(POSITION_CAP - 1), Integer))
    if outer is not None:
        ahead = ahead.correlate(outer)
    return select(literal_column("1", Integer) + func.count()).select_from(ahead.subquery())


def queue_position(conn: Connection, job: Job) -> int | None:
    """An estimate for a queued job: 1 + the queued jobs of its task that priority-then-age order puts
    first (fair share between tenants may start it sooner); counted up to POSITION_CAP."""
    if job.status is not JobStatus.QUEUED:
        return None
    condition = runs_before(job.task, job.priority, job.created_at, job.id)
    return int(conn.execute(count_ahead(condition)).scalar_one())


def purge_events(conn: Connection, older_than_s: float, limit: int = 5000) -> int:
    """Delete those of the `limit` oldest events (a bounded pkey scan; ids follow time) older than
    `older_than_s`; return how many went."""
    head = select(job_events.c.id, job_events.c.created_at).order_by(job_events.c.id).limit(limit).subquery()
    old = select(head.c.id).where(head.c.created_at < func.now() - timedelta(seconds=older_than_s))
    return int(
        conn.execute(job_events.delete().where(job_events.c.id.in_(old.scalar_subquery()))).rowcount or 0
    )
