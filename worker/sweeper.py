"""The sweeper (beat, every sweep_interval_s): recover jobs of lost workers and lost batch tickets.

Requeues running jobs whose lease expired (failing poison jobs after max_attempts worker losses; transient
put-backs do not count); then, if it requeued any or a job has waited longer than requeue_after_s (its
ticket may be lost), tops every model queue up to one ticket per claimable batch (core.queue.top_up).
Otherwise it leaves the queues alone: a worker between taking a ticket and claiming its batch would make
a top-up publish a spare. Also drops Idempotency-Key records past their retention and folds the job
counters' delta rows, deletes expired results and inputs (core.retention) and old job events, and walks a
few pages of the bucket for inputs no row names (core.retention.collect_orphans).
"""

from __future__ import annotations

import logging

from celery import Celery, shared_task
from sqlalchemy import Engine, RowMapping

from core import retention
from core.counts import compact_counts
from core.db import transaction
from core.events import purge_events
from core.idempotency import purge_expired
from core.jobs import expire_leases, find_unclaimed
from core.queue import SWEEP_MAX_PUBLISH, TASK_SWEEP, top_up
from core.records import TASKS, Job
from core.settings import Settings
from core.storage import Storage
from worker.runtime import TRANSIENT_ERRORS, NexusGenTask

log = logging.getLogger(__name__)


def sweep_database(
    engine: Engine, settings: Settings
) -> tuple[list[Job], list[Job], list[RowMapping], int, int]:
    """The sweep's one transaction: (requeued jobs, poisoned jobs, forgotten queued jobs, keys purged,
    job events purged).

    Every query in it reads a bounded number of rows (partial indexes, the counters), whatever the depth.
    """
    with transaction(engine) as conn:
        requeued, poisoned = expire_leases(conn, max_attempts=settings.max_attempts)
        unclaimed = find_unclaimed(conn, older_than_s=settings.requeue_after_s)
        purged = purge_expired(conn, settings.idempotency_ttl_s)
        events_purged = purge_events(conn, settings.result_ttl_s)  # live-stream history, kept as long
        folded = compact_counts(conn)
    log.debug("sweep folded %d counter rows", folded)
    return requeued, poisoned, unclaimed, purged, events_purged


def sweep(
    engine: Engine, publisher: Celery, settings: Settings, storage: Storage | None = None
) -> dict[str, int]:
    """One sweep; returns counts (requeued, poisoned, tickets published, keys and events purged, and
    retention's deletions when `storage` is given)."""
    requeued, poisoned, unclaimed, purged, events_purged = sweep_database(engine, settings)
    tickets = 0
    if requeued or unclaimed:  # after the commit: a worker that takes a ticket now must see them queued
        tickets = top_up(engine, publisher, settings.max_batch, TASKS, max_publish=SWEEP_MAX_PUBLISH)
    counts = {
        "requeued": len(requeued),
        "poisoned": len(poisoned),
        "tickets": tickets,
        "idempotency_keys_purged": purged,
        "job_events_purged": events_purged,
    }
    if storage is not None:
        counts.update(retention.expire(engine, storage, orphan_grace_s=settings.orphan_grace_s))
    if any(counts.values()):
        log.info("sweep: %s", counts)
    return counts


@shared_task(base=NexusGenTask, name=TASK_SWEEP, bind=True, ignore_result=True, autoretry_for=())
def sweep_task(self: NexusGenTask) -> dict[str, int]:
    """Celery entry point of TASK_SWEEP; a failed sweep is simply redone by the next beat."""
    try:
        return sweep(self.engine, self.runtime, self.settings, self.storage)
    except TRANSIENT_ERRORS as exc:
        log.warning("sweep skipped (%s); the next beat retries", exc.__class__.__name__)
        return {}
