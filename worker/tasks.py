"""The model task: each `nexusgen.run_batch` execution claims ONE batch from Postgres and runs it.

A message is a ticket for one batch of a task family (core.queue.top_up keeps one per claimable batch in
the broker). The jobs live in Postgres and are claimed exclusively when the task starts, so a duplicated
ticket claims nothing and a lost one is re-published by the next top-up. Flower lists every batch: once
claimed, the task announces its bucket, job ids, tenants and size, and its result names each job's
outcome. A transient infrastructure error puts the jobs back and retries the task (RETRY in Flower); any
other exception ends the batch's leases for the sweeper and fails the task (FAILURE, with the error).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery, Task, current_app, shared_task
from celery.signals import worker_process_init
from celery.utils.saferepr import saferepr
from sqlalchemy import Engine

from core import jobs as jobstate
from core.db import transaction
from core.queue import TASK_RUN_BATCH, top_up
from core.records import Job
from core.settings import Settings
from core.webhooks import publish_delivery_kick
from worker.app import PRELOAD_KEY, NexusGenCelery
from worker.batching import gather_and_claim, release_claims
from worker.runtime import TRANSIENT_ERRORS, NexusGenTask

log = logging.getLogger(__name__)


def put_back(engine: Engine, rows: Sequence[Job], exc: BaseException) -> None:
    """Requeue the jobs of a batch hit by a transient error (those this worker still holds)."""
    log.warning("transient %s during a batch; putting its jobs back", exc.__class__.__name__)
    try:
        release_claims(engine, rows, reason=f"transient error: {exc.__class__.__name__}")
    except TRANSIENT_ERRORS:
        log.warning("could not put the jobs back; their leases will expire and the sweeper requeues them")


def end_leases(engine: Engine, rows: Sequence[Job]) -> None:
    """After a crash: let the batch's leases run out now, so the next sweep requeues (or poisons) them."""
    try:
        with transaction(engine) as conn:
            jobstate.end_leases(conn, [(job.id, job.attempt) for job in rows])
    except TRANSIENT_ERRORS:
        log.warning("could not end the leases; they run out on their own")


def lease_owner(task: Task) -> str:
    """Who holds the batch's leases: the worker node, the pool process and the task id.

    worker.revoke rebuilds it from a revoke request to cancel exactly this batch's jobs.
    """
    return f"{task.request.hostname}/{os.getpid()}/{task.request.id}"


def announce(task: Task, rows: Sequence[Job]) -> None:
    """Tell Flower what this batch is: a name with its bucket in words; its job ids, tenants and size.

    A second task-started event: Flower merges its fields into the task it already lists.
    """
    bucket = rows[0].bucket
    details = {
        "size": len(rows),
        "jobs": [job.id for job in rows],
        "tenants": sorted({job.tenant_id for job in rows}),
    }
    try:
        task.send_event(
            "task-started",
            retry=False,
            name=f"{TASK_RUN_BATCH} {jobstate.describe_bucket(bucket)}",
            args=saferepr([rows[0].task.value, bucket], maxlen=1024),
            kwargs=saferepr(details, maxlen=BatchTask.resultrepr_maxsize),
        )
    except TRANSIENT_ERRORS as exc:  # monitoring only: the batch runs regardless
        log.warning("batch not announced to Flower (%s)", exc.__class__.__name__)


def after_batch(app: Celery, settings: Settings, engine: Engine, task: str) -> None:
    """Deliver the batch's webhooks now and keep a ticket per remaining batch in the queue."""
    try:
        publish_delivery_kick(app)  # the events are committed: deliver now, not at the next beat poll
        top_up(engine, app, settings.max_batch, [task])
    except TRANSIENT_ERRORS as exc:
        log.warning("kick or top-up not sent (%s); beat's poll and sweep send them", exc.__class__.__name__)


class BatchTask(NexusGenTask):
    """The batch task's options: a result long enough for every job, no redelivery after a lost worker.

    NexusGenTask retries transient errors (RETRY in Flower) after claim_and_run put the jobs back.
    """

    resultrepr_maxsize = 16384
    # A killed pool process fails the task (FAILURE, WorkerLostError) and acks its ticket; its jobs come
    # back through their leases and run as a new task, never under this task id again.
    reject_on_worker_lost = False


def claim_and_run(
    app: NexusGenCelery,
    task: str,
    bucket: str | None,
    owner: str,
    on_claimed: Callable[[Sequence[Job]], object] = lambda rows: None,
) -> dict[str, Any]:
    """Claim the next batch of `task` (from `bucket` while it has queued jobs), run it, store its results.

    Returns what Flower shows as the task's result: the bucket, size, each job's outcome, worker, device.
    A transient error puts the jobs back and propagates; any other error ends their leases and propagates.
    """
    settings = app.settings
    if task not in settings.tasks:
        log.warning("ticket for %s ignored: this worker serves %s", task, ",".join(settings.tasks))
        return {"task": task, "size": 0, "jobs": {}, "note": f"this worker does not serve {task}"}
    from worker import execute, results  # imports torch: only in processes that run the model

    engine, storage = app.engine, app.storage
    model = execute.load_model(settings)
    rows = gather_and_claim(engine, settings, owner, task, bucket)
    if not rows and bucket is not None:
        rows = gather_and_claim(engine, settings, owner, task, None)
    if not rows:
        return {"task": task, "size": 0, "jobs": {}, "note": "nothing to claim: a spare ticket"}
    on_claimed(rows)
    try:
        computed = execute.compute_batch(settings, engine, storage, rows)
        outcomes = results.store_batch(engine, storage, app.worker_id, computed)
    except TRANSIENT_ERRORS as exc:
        put_back(engine, rows, exc)
        raise
    except BaseException:
        end_leases(engine, rows)
        raise
    after_batch(app, settings, engine, task)
    return {
        "task": task,
        "bucket": rows[0].bucket,
        "size": len(rows),
        "jobs": outcomes,
        "worker": app.worker_id,
        "device": str(model.device),
    }


@shared_task(base=BatchTask, name=TASK_RUN_BATCH, bind=True)
def run_batch(self: BatchTask, task: str, bucket: str | None = None) -> dict[str, Any]:
    """Celery entry point of TASK_RUN_BATCH(task, bucket); BatchTask retries transient errors."""
    return claim_and_run(self.runtime, task, bucket, lease_owner(self), lambda rows: announce(self, rows))


@worker_process_init.connect(weak=False)
def preload_model(**_: Any) -> None:
    """In a model worker's pool process, load the model now on a thread (a batch that comes first waits
    for it), so that a batch's runtime in Flower is its own and its ticket is claimed without delay."""
    if not isinstance(current_app, NexusGenCelery) or not current_app.conf.get(PRELOAD_KEY):
        return
    settings = current_app.settings

    def load() -> None:
        from worker import execute

        try:
            execute.load_model(settings)
        except Exception:  # the first batch loads it again and fails visibly (FAILURE in Flower)
            log.exception("model preload failed")

    threading.Thread(target=load, name="nexusgen-preload", daemon=True).start()
