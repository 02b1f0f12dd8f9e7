"""The sweeper (beat, every sweep_interval_s): recover jobs of lost workers and lost wake-ups.

Requeues running jobs whose lease expired (failing poison jobs after max_attempts), then re-publishes
one wake-up per (task, bucket) for those and for queued jobs nobody claimed for requeue_after_s;
also drops Idempotency-Key records past their retention.
"""

from __future__ import annotations

import logging

from celery import Celery, Task, shared_task
from sqlalchemy import Engine

from core.db import transaction
from core.idempotency import purge_expired
from core.jobs import expire_leases, take_unclaimed
from core.queue import TASK_SWEEP, publish_wakeups
from core.settings import Settings
from worker.batching import TRANSIENT_ERRORS

log = logging.getLogger(__name__)


def sweep(engine: Engine, publisher: Celery, settings: Settings) -> dict[str, int]:
    """One sweep; returns counts (requeued, poisoned, unclaimed, wakeups)."""
    with transaction(engine) as conn:
        requeued, poisoned = expire_leases(conn, max_attempts=settings.max_attempts)
        unclaimed = take_unclaimed(conn, older_than_s=settings.requeue_after_s)
        purged = purge_expired(conn, settings.idempotency_ttl_s)
    # After the commit: a worker woken now must see the jobs queued.
    pairs = [(job.task.value, job.bucket) for job in requeued] + [(r["task"], r["bucket"]) for r in unclaimed]
    wakeups = publish_wakeups(publisher, pairs)
    counts = {
        "requeued": len(requeued),
        "poisoned": len(poisoned),
        "unclaimed": len(unclaimed),
        "wakeups": wakeups,
        "idempotency_keys_purged": purged,
    }
    if any(counts.values()):
        log.info("sweep: %s", counts)
    return counts


@shared_task(name=TASK_SWEEP, bind=True, ignore_result=True)
def sweep_task(self: Task) -> dict[str, int]:
    """Celery entry point of TASK_SWEEP; a failed sweep is simply redone by the next beat."""
    from worker.tasks import app_resources

    settings, app = app_resources(self.app)
    try:
        return sweep(app.engine, app, settings)
    except TRANSIENT_ERRORS as exc:
        log.warning("sweep skipped (%s); the next beat retries", exc.__class__.__name__)
        return {}
