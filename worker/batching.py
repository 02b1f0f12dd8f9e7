"""Cross-job batching: pick the head bucket, wait briefly for batch mates, and claim one batch.

Each batch task claims one batch; spare tickets are harmless because `core.jobs.claim_batch` claims
exclusively (FOR UPDATE SKIP LOCKED).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from sqlalchemy import Engine

from core import jobs as jobstate
from core.db import transaction
from core.records import Job
from core.settings import Settings

log = logging.getLogger(__name__)

POLL_S = 0.05


def gather_and_claim(
    engine: Engine, settings: Settings, worker_id: str, task: str, bucket: str | None
) -> list[Job]:
    """Claim the next batch of `task` (in `bucket` if given), tenants taking turns (core.fair_share).

    With fewer than max_batch jobs queued, wait until the oldest of them has waited batch_window_s, so
    jobs submitted a moment apart share one model call; a full bucket or an old job is claimed at once.
    """
    while True:
        with engine.connect() as conn:  # the peek locks nothing: claims of other workers go on
            head = jobstate.peek_head(
                conn,
                [task],
                bucket,
                full_at=settings.max_batch,
                window_s=settings.batch_window_s,
                max_running=settings.tenant_max_running,
            )
        if head is None:
            return []
        wait = settings.batch_window_s - head.age_s
        if head.available < settings.max_batch and wait > 0:
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
                head=head,
                default_max_running=settings.tenant_max_running,
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
