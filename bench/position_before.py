"""GET /v1/jobs/{id}'s statement of before the position rule of core.events.position_sql, for bench_queue's
side-by-side rows: the job, its result and a count of every queued job of the task ahead of it in
priority-then-age order (up to 100,000 rows), run the same way (psycopg, prepared) on the same data."""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import Connection, bindparam, case, literal_column, select
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect

from core.schema import jobs, results

_COUNT = """(SELECT 1 + count(*) FROM (SELECT ahead.id FROM jobs AS ahead WHERE ahead.status = 'queued'
    AND ahead.task = jobs.task AND (ahead.priority > jobs.priority OR (ahead.priority = jobs.priority
    AND (ahead.created_at < jobs.created_at OR (ahead.created_at = jobs.created_at AND ahead.id < jobs.id))))
    LIMIT 99999) AS a)"""


@functools.cache
def _sql() -> str:
    statement = (
        select(
            jobs,
            *(column.label("result_" + column.name) for column in results.c),
            case((jobs.c.status == literal_column("'queued'"), literal_column(_COUNT))).label(
                "queue_position"
            ),
        )
        .select_from(jobs.outerjoin(results, results.c.job_id == jobs.c.id))
        .where(jobs.c.id == bindparam("job_id"), jobs.c.tenant_id == bindparam("tenant_id"))
    )
    return statement.compile(dialect=psycopg_dialect()).string


def read_job_view(conn: Connection, tenant_id: str, job_id: str) -> Any:
    """The row of before (its last column the position), or None."""
    driver: Any = conn.connection.driver_connection
    return driver.execute(_sql(), {"job_id": job_id, "tenant_id": tenant_id}, prepare=True).fetchone()
