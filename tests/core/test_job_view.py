"""GET's read against a real PostgreSQL: the same job, result and queue position as the separate reads,
and a plan Postgres keeps instead of planning the position again at each execution."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, select, text, update

from core import jobs as sm
from core.db import make_engine
from core.events import queue_position
from core.job_view import position_view, read_job_view
from core.records import Job, JobResult, JobStatus
from core.schema import jobs, results
from tests.core.test_jobs import _jobs, _tenant


def test_the_read_gives_what_the_separate_reads_do(engine: Engine, clean_db: Any) -> None:
    with engine.begin() as conn:
        tenant, other = _tenant(conn), _tenant(conn)
        done, failed, first, second = _jobs(conn, tenant, 4)
        (urgent,) = _jobs(conn, tenant, 1, priority=5)
    with engine.begin() as conn:
        (job,) = sm.claim_batch(conn, worker_id="w", tasks=["generate"], max_batch=1, lease_s=60)
        assert job.id == urgent
        sm.complete_job(
            conn, urgent, job.attempt, provenance={"seed": 3}, result={"kind": "text", "text": "ok"}
        )
        for job_id in (done, failed):
            (job,) = sm.claim_batch(conn, worker_id="w", tasks=["generate"], max_batch=1, lease_s=60)
            assert job.id == job_id
        result = {"kind": "image", "object_key": "k", "content_type": "image/png", "width": 8, "height": 8}
        sm.complete_job(conn, done, 1, provenance={}, result=result)
        sm.fail_job(conn, failed, 1, code="no_image_token", message="none")
        (elsewhere,) = _jobs(conn, other, 1)
    with engine.connect() as conn:
        for job_id in (urgent, done, failed, first, second):
            job = Job.from_row(conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().one())
            row = conn.execute(select(results).where(results.c.job_id == job_id)).mappings().first()
            expected = (job, JobResult.from_row(row) if row else None, queue_position(conn, job, 8))
            assert read_job_view(conn, tenant, job_id, 8) == expected, job_id
        # fair share: the other tenant, never served, takes its turn before this one's next
        assert [read_job_view(conn, tenant, i, 8)[2] for i in (first, second)] == [2, 3]  # type: ignore[index]
        assert read_job_view(conn, tenant, done, 8)[0].status is JobStatus.SUCCEEDED  # type: ignore[index]
        assert read_job_view(conn, tenant, elsewhere, 8) is None  # another tenant's job is not found
        assert read_job_view(conn, other, elsewhere, 8)[2] == 1  # type: ignore[index]
        assert read_job_view(conn, tenant, "job_missing", 8) is None


def test_postgres_keeps_one_plan_for_the_read(settings: Any, engine: Engine, clean_db: Any) -> None:
    """The position's prepared statement has a generic plan that can use the partial indexes on queued jobs,
    so Postgres adopts it after its five trial plans; with 'queued' bound as a parameter it planned every
    execution again."""
    with engine.begin() as conn:  # a table big enough for the plans' costs to differ: few jobs queued
        tenant = _tenant(conn)
        ids = _jobs(conn, tenant, 3000)
        conn.execute(update(jobs).where(jobs.c.id.in_(ids[100:])).values(status=JobStatus.SUCCEEDED))
        conn.execute(text("ANALYZE jobs"))
    reader = make_engine(settings, 1, autocommit=True, max_overflow=0)
    try:
        with reader.connect() as conn:
            for i in range(20):  # psycopg prepares a statement on its 5th execution
                assert read_job_view(conn, tenant, ids[i % 3], 8) is not None
            plans = conn.execute(
                text(
                    "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                    "WHERE statement LIKE :start"
                ),
                {"start": position_view(8).sql[:60] + "%"},
            ).one()
    finally:
        reader.dispose()
    assert plans.generic_plans >= 10 and plans.custom_plans <= 5, plans
