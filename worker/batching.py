"""Cross-job batching: pick the head bucket, wait briefly for batch mates, claim, and drain the queue.

One wake-up drains every queued job of its task family, batch after batch; duplicate wake-ups are
harmless because `core.jobs.claim_batch` claims exclusively (FOR UPDATE SKIP LOCKED).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import urllib3.exceptions
from kombu.exceptions import OperationalError as BrokerError
from minio.error import ServerError as S3ServerError
from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.exc import InterfaceError, OperationalError

from core import jobs as jobstate
from core.db import transaction
from core.records import Job, JobStatus
from core.schema import jobs
from core.settings import Settings

log = logging.getLogger(__name__)

POLL_S = 0.05
DRAIN_BUDGET_S = 30.0  # one task drains for at most this long, then hands over to a fresh wake-up
# Infrastructure hiccups worth a retry (database, object storage, broker), never bad input or OOM.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OperationalError,
    InterfaceError,
    urllib3.exceptions.HTTPError,
    S3ServerError,
    BrokerError,
    ConnectionError,
    TimeoutError,
)


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


RunBatch = Callable[[Sequence[Job]], object]


def drain(
    engine: Engine,
    settings: Settings,
    worker_id: str,
    task: str,
    bucket: str | None,
    run_batch: RunBatch,
    budget_s: float = DRAIN_BUDGET_S,
    on_budget_spent: Callable[[], object] | None = None,
) -> int:
    """Claim and run batches of `task` until none is queued (named bucket first); returns jobs claimed.

    After `budget_s` the drain stops and calls `on_budget_spent` (which re-publishes a wake-up), so one
    task never runs for hours: a worker asked to shut down waits for one batch, not for a whole queue.
    """
    claimed = 0
    deadline = time.monotonic() + budget_s
    while True:
        if time.monotonic() > deadline and on_budget_spent is not None:
            on_budget_spent()
            return claimed
        rows = gather_and_claim(engine, settings, worker_id, task, bucket)
        if not rows:
            if bucket is None:
                return claimed
            bucket = None  # the named bucket is empty: go on with the rest of this task's queue
            continue
        claimed += len(rows)
        log.info("claimed %d %s job(s) of bucket %s", len(rows), task, rows[0].bucket)
        run_batch(rows)
