"""The read behind GET /v1/jobs/{id}: the job, its result and a queued job's position in ONE statement.

Three statements (job, result, position) cost three round trips and three trips through SQLAlchemy's
execution and result machinery; this is one, built once per batch size, with a LEFT JOIN for the result
and core.events' position rule (bounded index ranges and the queue rollups: the same cost at any depth).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import psycopg
from sqlalchemy import Connection, Select, bindparam, select
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect

from core.events import position_column
from core.records import Job, JobResult
from core.schema import jobs, results

_RESULT = (
    "result_"  # the result's columns come labelled with this prefix (ids and times clash with the job's)
)


@functools.cache
def job_view(batch: int) -> tuple[Select[Any], str, tuple[str, ...], tuple[str, ...]]:
    """The statement for claims of `batch` jobs (NEXUSGEN_MAX_BATCH; the position's rule depends on it), the
    same in PostgreSQL's own `$n` placeholders, the names of those parameters in order, and the names of
    its columns in order.

    psycopg rewrites `%(name)s` placeholders into `$n` for every execution of a statement longer than
    4 KiB (shorter ones it caches); this one is longer, so it is written with `$n` once, here, and run by a
    raw cursor, which takes it as it is."""
    statement = (
        select(
            jobs,
            *(column.label(_RESULT + column.name) for column in results.c),
            position_column(batch).label("queue_position"),
        )
        .select_from(jobs.outerjoin(results, results.c.job_id == jobs.c.id))
        .where(jobs.c.id == bindparam("job_id"), jobs.c.tenant_id == bindparam("tenant_id"))
    )
    compiled = statement.compile(dialect=psycopg_dialect(paramstyle="numeric_dollar"))
    assert compiled.positiontup is not None
    return statement, compiled.string, tuple(compiled.positiontup), tuple(statement.selected_columns.keys())


def read_job_view(
    conn: Connection, tenant_id: str, job_id: str, batch: int
) -> tuple[Job, JobResult | None, int | None] | None:
    """(job, its result or None, its queue position when queued), or None when the tenant has no such job.

    For an autocommit connection (the API's reader). The statement goes to psycopg directly, prepared,
    with plain tuple rows: SQLAlchemy's execution and result set-up for 46 columns cost twice the rest of
    the read (0.45 against 0.2 ms of CPU, bench/bench_get.py). On a driver error the statement runs again
    through SQLAlchemy, whose handling then applies: the error wrapped (an outage answers 503) and, after
    a disconnect, the pool's connections of before it dropped.
    """
    statement, sql, order, names = job_view(batch)
    params = {"job_id": job_id, "tenant_id": tenant_id}
    driver = conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    try:
        with psycopg.RawCursor(driver) as cursor:
            values: Sequence[Any] | None = cursor.execute(
                sql, [params[name] for name in order], prepare=True
            ).fetchone()
    except psycopg.Error:
        values = conn.execute(statement, params).first()
    if values is None:
        return None
    row = dict(zip(names, values, strict=True))
    job = Job.from_row(row)
    result = None
    if row[_RESULT + "job_id"] is not None:
        result = JobResult.from_row(
            {name[len(_RESULT) :]: row[name] for name in names if name.startswith(_RESULT)}
        )
    return job, result, row["queue_position"]
