"""Cross-job batching: pick the head bucket, wait briefly for batch mates, and claim one batch.

Each batch task claims one batch; spare tickets are harmless because `core.jobs.claim_batch` claims
exclusively (FOR UPDATE SKIP LOCKED).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, func, select

from core import jobs as jobstate
from core.db import transaction
from core.records import Job, JobStatus
from core.schema import jobs
from core.settings import Settings

log = logging.getLogger(__name__)

POLL_S = 0.05


@dataclass(frozen=True)
class Head:
    """The bucket the next claim would take, how many of its jobs wait, and the oldest one's age."""

    bucket: str
    queued: int
    age_s: float


def peek_head(conn: Connection, task: str, bucket: str | None) -> Head | None:
    """The bucket of the first queued job (priority, then age) of `task`, without locking anything."""
    waiting = (jobs.c.status == JobStatus.QUEUED, jobs.c.cancel_requested.is_(False))
    head_q = select(jobs.c.bucket).where(*waiting, jobs.c.task == task)
    if bucket is not None:
        head_q = head_q.where(jobs.c.bucket == bucket)
    head = conn.execute(
        head_q.order_by(jobs.c.priority.desc(), jobs.c.created_at, jobs.c.id).limit(1)
    ).scalar_one_or_none()
    if head is None:
        return None
    queued, age = conn.execute(
        select(func.count(), func.extract("epoch", func.now() - func.min(jobs.c.enqueued_at))).where(
            *waiting, jobs.c.bucket == head
        )
    ).one()
    return Head(bucket=head, queued=int(queued), age_s=float(age or 0.0))


def gather_and_claim(
    engine: Engine, settings: Settings, worker_id: str, task: str, bucket: str | None
) -> list[Job]:
    """Claim the next batch of `task` (in `bucket` if given).

    With fewer than max_batch jobs queued, wait until the oldest of them has waited batch_window_s, so
    jobs submitted a moment apart share one model call; a full bucket or an old job is claimed at once.
    """
    while True:
        with engine.connect() as conn:
            head = peek_head(conn, task, bucket)
        if head is None:
            return []
        wait = settings.batch_window_s - head.age_s
        if head.queued < settings.max_batch and wait > 0:
            time.sleep(min(wait, POLL_S))
            continue
        with transaction(engine) as conn:
            rows = jobstate.claim_batch(
                conn,
                worker_id=worker_id,
                tasks=[task],
                max_batch=settings.max_batch,
                lease_s=settings.lease_s,
                bucket=head.bucket,
            )
        if rows:
            return rows
        time.sleep(POLL_S)  # another worker claimed that bucket first: look again


def release_claims(engine: Engine, rows: Sequence[Job], reason: str) -> int:
    """Put back the jobs of a batch that this worker still holds (after a transient error)."""
    released = 0
    with transaction(engine) as conn:
        for job in rows:
            released += jobstate.requeue_job(conn, job.id, job.attempt, reason=reason)
    return released
