"""The read behind GET /v1/jobs/{id}: the job and its result in one statement, and for a queued job its
queue position in a second.

Both go to psycopg directly, prepared, with plain tuple rows. Through SQLAlchemy, three statements (job,
result, position) had cost three round trips and three trips through its execution and result set-up.
The position (core.events' rule: bounded index ranges and the queue rollups, the same cost at any depth)
is a statement of its own because Postgres starts up every sub-plan of a statement at each execution,
also those a CASE never reaches: with the position inside, reading a job that is not queued cost 0.25 ms
of Postgres CPU, against 0.05 ms without it. Three reads in four are of jobs that are not queued (polling
clients wait for the end); a queued job's read pays a second round trip.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import Connection, Select, bindparam, select
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect

from core.events import position_column
from core.records import Job, JobResult, JobStatus
from core.schema import jobs, results

_RESULT = (
    "result_"  # the result's columns come labelled with this prefix (ids and times clash with the job's)
)


@dataclass(frozen=True)
class Prepared:
    """A statement, the same in PostgreSQL's own `$n` placeholders, the names of those parameters in order,
    and the names of its columns in order.

    psycopg rewrites `%(name)s` placeholders into `$n` at every execution of a statement longer than 4 KiB
    (shorter ones it caches; the position's rule is close to that); these are written with `$n` once,
    here, and run by a raw cursor, which takes them as they are."""

    statement: Select[Any]
    sql: str
    order: tuple[str, ...]
    names: tuple[str, ...]

    @classmethod
    def of(cls, statement: Select[Any]) -> Prepared:
        compiled = statement.compile(dialect=psycopg_dialect(paramstyle="numeric_dollar"))
        assert compiled.positiontup is not None
        return cls(
            statement, compiled.string, tuple(compiled.positiontup), tuple(statement.selected_columns.keys())
        )

    def fetch(self, conn: Connection, params: dict[str, Any]) -> Sequence[Any] | None:
        """The first row, or None. On a driver error the statement runs again through SQLAlchemy, whose
        handling then applies: the error wrapped (an outage answers 503) and, after a disconnect, the
        pool's connections of before it dropped."""
        driver = conn.connection.driver_connection
        assert isinstance(driver, psycopg.Connection)
        try:
            with psycopg.RawCursor(driver) as cursor:
                return cursor.execute(self.sql, [params[n] for n in self.order], prepare=True).fetchone()
        except psycopg.Error:
            return conn.execute(self.statement, params).first()


_WHERE = (jobs.c.id == bindparam("job_id"), jobs.c.tenant_id == bindparam("tenant_id"))


@functools.cache
def job_view() -> Prepared:
    """The job with its result's columns (labelled `result_...`; NULL without a result)."""
    return Prepared.of(
        select(jobs, *(column.label(_RESULT + column.name) for column in results.c))
        .select_from(jobs.outerjoin(results, results.c.job_id == jobs.c.id))
        .where(*_WHERE)
    )


@functools.cache
def position_view(batch: int) -> Prepared:
    """A queued job's position for claims of `batch` jobs (NEXUSGEN_MAX_BATCH; the rule depends on it);
    NULL once the job is no longer queued."""
    return Prepared.of(select(position_column(batch).label("queue_position")).where(*_WHERE))


def read_job_view(
    conn: Connection, tenant_id: str, job_id: str, batch: int
) -> tuple[Job, JobResult | None, int | None] | None:
    """(job, its result or None, its queue position when queued), or None when the tenant has no such job.

    For an autocommit connection (the API's reader): a job claimed between the two statements shows as
    queued without a position, as one claimed just after the read would show a stale one.
    """
    params = {"job_id": job_id, "tenant_id": tenant_id}
    view = job_view()
    values = view.fetch(conn, params)
    if values is None:
        return None
    row = dict(zip(view.names, values, strict=True))
    job = Job.from_row(row)
    result = None
    if row[_RESULT + "job_id"] is not None:
        result = JobResult.from_row(
            {name[len(_RESULT) :]: row[name] for name in view.names if name.startswith(_RESULT)}
        )
    position = None
    if job.status is JobStatus.QUEUED:
        found = position_view(batch).fetch(conn, params)
        position = found[0] if found is not None else None
    return job, result, position
