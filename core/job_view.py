"""The read behind GET /v1/jobs/{id}: the job, its result and a queued job's position in ONE statement.

Three statements (job, result, position) cost three round trips and three trips through SQLAlchemy's
execution and result machinery; this is one, built once at import, with a LEFT JOIN for the result and
a correlated count (core.events' priority-then-age rule, capped the same) for the position.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Select, bindparam, case, select

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


def read_job_view(
    conn: Connection, tenant_id: str, job_id: str
) -> tuple[Job, JobResult | None, int | None] | None:
    """(job, its result or None, its queue position when queued), or None when the tenant has no such job."""
    row = conn.execute(JOB_VIEW, {"job_id": job_id, "tenant_id": tenant_id}).mappings().first()
    if row is None:
        return None
    job = Job.from_row(row)
    result = None
    if row[_RESULT + "job_id"] is not None:
        result = JobResult.from_row(
            {name[len(_RESULT) :]: row[name] for name in row if name.startswith(_RESULT)}
        )
    return job, result, row["queue_position"]
