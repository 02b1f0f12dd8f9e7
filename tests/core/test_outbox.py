"""The outbox: an event commits with its state change or not at all; progress events are opt-in, throttled."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest
from sqlalchemy import func, select

from core.jobs import record_progress
from core.records import Job
from core.schema import jobs, webhook_deliveries, webhook_events
from core.webhooks import enqueue_progress_event
from tests.support.webhooks import start_job

pytestmark = pytest.mark.usefixtures("outside_connections")  # tests never leave the machine

# Runs one state change in a transaction and dies (os._exit, no cleanup) before or after the commit.
_CHILD = textwrap.dedent(
    """
    import os, sys
    from core.db import make_engine
    from core.jobs import cancel_job, complete_job, fail_job
    from core.settings import Settings

    url, action, job_id, attempt, tenant_id, when = sys.argv[1:]
    engine = make_engine(Settings(database_url=url))
    conn = engine.connect()
    tx = conn.begin()
    if action == "complete":
        result = {"kind": "text", "text": "a fox"}
        assert complete_job(conn, job_id, int(attempt), provenance={}, result=result)
    elif action == "fail":
        assert fail_job(conn, job_id, int(attempt), code="boom", message="worker blew up")
    else:
        assert cancel_job(conn, tenant_id, job_id) is not None
    if when == "before_commit":
        os._exit(9)
    tx.commit()
    os._exit(9)
    """
)


def _state(engine: Any, job_id: str) -> tuple[str, int]:
    with engine.connect() as conn:
        status = conn.execute(select(jobs.c.status).where(jobs.c.id == job_id)).scalar_one()
        events = conn.execute(select(func.count()).where(webhook_events.c.job_id == job_id)).scalar_one()
    return status, int(events)


@pytest.mark.parametrize("action", ["complete", "fail", "cancel"])
@pytest.mark.parametrize("when", ["before_commit", "after_commit"])
def test_state_change_and_event_commit_together(
    engine: Any, settings: Any, webhook_tenant: Any, action: str, when: str
) -> None:
    job_id, attempt = start_job(engine, webhook_tenant["id"], webhook_url="https://hooks.example/in")
    if action == "cancel":  # a queued job is canceled at once; put it back to queued
        with engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(status="queued"))
    before = _state(engine, job_id)
    args = [settings.database_url, action, job_id, str(attempt), webhook_tenant["id"], when]
    proc = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    status, events = _state(engine, job_id)
    if when == "before_commit":
        assert (status, events) == (before[0], 0)
    else:
        expected = {"complete": "succeeded", "fail": "failed", "cancel": "canceled"}[action]
        assert (status, events) == (expected, 1)
        with engine.connect() as conn:
            delivery = conn.execute(select(webhook_deliveries).where(webhook_deliveries.c.job_id == job_id))
            assert [d.status for d in delivery] == ["pending"]


def test_progress_events_only_when_asked_and_throttled(engine: Any, webhook_tenant: Any) -> None:
    quiet_id, quiet_attempt = start_job(engine, webhook_tenant["id"], webhook_url="https://hooks.example/in")
    with engine.begin() as conn:
        record_progress(conn, quiet_id, quiet_attempt, stage="denoising", step=1, total_steps=4)
    events = ["job.progress", "job.succeeded"]
    job_id, attempt = start_job(
        engine,
        webhook_tenant["id"],
        webhook_url="https://hooks.example/in",
        webhook_events=events,
        custom_id="row-2",
    )
    for step in range(1, 4):  # through the state machine, as the worker records progress
        with engine.begin() as conn:
            record_progress(conn, job_id, attempt, stage="denoising", step=step, total_steps=4)
    with engine.begin() as conn:
        job = Job.from_row(conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().one())
        assert enqueue_progress_event(conn, job) is None  # still within the interval
        rows = conn.execute(select(webhook_events).order_by(webhook_events.c.id)).mappings().all()
    assert [(r["type"], r["job_id"]) for r in rows] == [("job.progress", job_id)]
    data = rows[0]["payload"]["data"]
    assert (data["stage"], data["step"], data["total_steps"]) == ("denoising", 1, 4)
    assert data["custom_id"] == "row-2" and data["status"] == "running"
