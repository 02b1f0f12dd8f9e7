"""The read behind GET /v1/jobs/{id}: the job, its result and a queued job's position in ONE statement.

Three statements (job, result, position) cost three round trips and three trips through SQLAlchemy's
execution and result machinery; this is one, built once at import, with a LEFT JOIN for the result and
a correlated count (core.events' priority-then-age rule, capped the same) for the position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from sqlalchemy import Connection, Select, bindparam, case, select
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect

from core.events import IS_QUEUED, count_ahead, runs_before
from core.records import Job, JobResult
from core.schema import jobs, results

_RESULT = (
    "result_"  # the result's columns come labelled with this prefix (ids and times clash with the job's)
)
_ahead = jobs.alias("ahead")
_position = count_ahead(
    runs_before(jobs.c.task, jobs.c.priority, jobs.c.created_at, jobs.c.id, _ahead), _ahead, outer=jobs
).scalar_subquery()
JOB_VIEW: Select[Any] = (
    select(
        jobs,
        *(column.label(_RESULT + column.name) for column in results.c),
        case((jobs.c.status == IS_QUEUED, _position)).label("queue_position"),
    )
    .select_from(jobs.outerjoin(results, results.c.job_id == jobs.c.id))
    .where(jobs.c.id == bindparam("job_id"), jobs.c.tenant_id == bindparam("tenant_id"))
)


# The statement as psycopg takes it, and the names of its columns in order.
_SQL = JOB_VIEW.compile(dialect=psycopg_dialect()).string
_NAMES = tuple(JOB_VIEW.selected_columns.keys())


def read_job_view(
    conn: Connection, tenant_id: str, job_id: str
) -> tuple[Job, JobResult | None, int | None] | None:
    """(job, its result or None, its queue position when queued), or None when the tenant has no such job.

    For an autocommit connection (the API's reader). The statement goes to psycopg directly, prepared,
    with plain tuple rows: SQLAlchemy's execution and result set-up for 46 columns cost twice the rest of
    the read (0.45 against 0.2 ms of CPU, bench/bench_get.py). On a driver error the statement runs again
    through SQLAlchemy, whose handling then applies: the error wrapped (an outage answers 503) and, after
    a disconnect, the pool's connections of before it dropped.
    """
    params = {"job_id": job_id, "tenant_id": tenant_id}
    driver = conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    try:
        values: Sequence[Any] | None = driver.execute(_SQL, params, prepare=True).fetchone()
    except psycopg.Error:
        values = conn.execute(JOB_VIEW, params).first()
    if values is None:
        return None
    row = dict(zip(_NAMES, values, strict=True))
    job = Job.from_row(row)
    result = None
    if row[_RESULT + "job_id"] is not None:
        result = JobResult.from_row(
            {name[len(_RESULT) :]: row[name] for name in _NAMES if name.startswith(_RESULT)}
        )
    return job, result, row["queue_position"]
