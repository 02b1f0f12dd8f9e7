"""The job event log against a real PostgreSQL: every transition appends its state; old events are purged;
queue positions follow priority then age."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, func, select, update

from core import jobs as sm
from core.events import events_after, purge_events, queue_position
from core.records import Job
from core.schema import job_events, jobs
from tests.core.test_jobs import _jobs, _tenant


def test_transitions_log_each_state_in_order_and_old_events_are_purged(engine: Engine, clean_db: Any) -> None:
    with engine.begin() as conn:
        tenant = _tenant(conn)
        (job_id,) = _jobs(conn, tenant, 1)
    with engine.begin() as conn:
        (job,) = sm.claim_batch(conn, worker_id="w", tasks=["generate"], max_batch=1, lease_s=60)
        sm.record_progress(conn, job_id, job.attempt, stage="encoding")
        sm.record_progress(conn, job_id, job.attempt, stage="denoising", step=1, total_steps=2)
        sm.complete_job(conn, job_id, job.attempt, provenance={}, result={"kind": "text", "text": "x"})
    with engine.connect() as conn:
        logged = events_after(conn, 0, job_id=job_id)
        assert [(e["status"], e["stage"], e["step"]) for e in logged] == [
            ("running", "starting", None),
            ("running", "encoding", None),
            ("running", "denoising", 1),
            ("succeeded", "done", 1),
        ]
        assert events_after(conn, logged[1]["id"], job_id=job_id) == logged[2:]
    with engine.begin() as conn:
        assert purge_events(conn, older_than_s=3600) == 0
        conn.execute(update(job_events).values(created_at=func.now() - func.make_interval(0, 0, 0, 2)))
        assert purge_events(conn, older_than_s=3600) == 4
        assert conn.execute(select(func.count()).select_from(job_events)).scalar_one() == 0


def test_queue_position_counts_the_jobs_that_run_first(engine: Engine, clean_db: Any) -> None:
    with engine.begin() as conn:
        tenant = _tenant(conn)
        first, second = _jobs(conn, tenant, 2)
        (urgent,) = _jobs(conn, tenant, 1, priority=5)
    with engine.connect() as conn:
        rows = {r["id"]: Job.from_row(r) for r in conn.execute(select(jobs)).mappings()}
        assert [queue_position(conn, rows[i]) for i in (urgent, first, second)] == [1, 2, 3]
