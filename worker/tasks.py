"""The model task: a wake-up for (task kind, bucket) drains that task family's queue in batches.

The message carries no job data; the jobs live in Postgres and are claimed exclusively, so a duplicated
wake-up finds nothing to do and a lost one is re-sent by the sweeper. The model stack (torch) is imported
and loaded only when the first wake-up runs, inside the worker child process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from celery import shared_task
from sqlalchemy import Engine

from core.queue import TASK_PROCESS, publish_wakeups
from core.records import Job
from core.webhooks import publish_delivery_kick
from worker.app import NexusGenCelery
from worker.batching import drain, release_claims
from worker.runtime import TRANSIENT_ERRORS, NexusGenTask

if TYPE_CHECKING:
    from worker.execute import ComputedBatch

log = logging.getLogger(__name__)


def put_back(engine: Engine, rows: Sequence[Job], exc: BaseException) -> None:
    """Requeue the jobs of a batch hit by a transient error (those this worker still holds)."""
    log.warning("transient %s during a batch; putting its jobs back", exc.__class__.__name__)
    try:
        release_claims(engine, rows, reason=f"transient error: {exc.__class__.__name__}")
    except TRANSIENT_ERRORS:
        log.warning("could not put the jobs back; their leases will expire and the sweeper requeues them")


class StoreBehind:
    """Stores one batch's results on a thread while the next batch is claimed and computed.

    At most one batch is in flight; a transient error while storing puts that batch's jobs back and is
    raised on the next `submit` or `close`.
    """

    def __init__(self, engine: Engine, store: Callable[[ComputedBatch], dict[str, int]]) -> None:
        self.engine, self.store = engine, store
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nexusgen-store")
        self._pending: tuple[Future[dict[str, int]], Sequence[Job]] | None = None

    def submit(self, rows: Sequence[Job], batch: ComputedBatch) -> None:
        try:
            self.wait()
        except TRANSIENT_ERRORS as exc:  # the batch before failed: this one goes back too
            batch.keeper.stop()
            put_back(self.engine, rows, exc)
            raise
        future = self._pool.submit(self.store, batch)
        self._pending = (future, rows)

    def wait(self) -> None:
        if self._pending is None:
            return
        (future, rows), self._pending = self._pending, None
        try:
            future.result()
        except TRANSIENT_ERRORS as exc:
            put_back(self.engine, rows, exc)
            raise

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def process(app: NexusGenCelery, task: str, bucket: str | None) -> int:
    """Drain the queue of `task` (starting with `bucket`); returns how many jobs this call claimed."""
    settings = app.settings
    if task not in settings.tasks:
        log.warning("wake-up for %s ignored: this worker serves %s", task, ",".join(settings.tasks))
        return 0
    from worker import execute  # imports torch: only in processes that run the model

    execute.load_model(settings)
    engine, storage, worker_id = app.engine, app.storage, app.worker_id

    def store_and_announce(batch: Any) -> dict[str, int]:
        counts = execute.store_batch(engine, storage, worker_id, batch)
        try:  # the events are committed: deliver now rather than at the next beat poll of the outbox
            publish_delivery_kick(app)
        except TRANSIENT_ERRORS as exc:
            log.warning("webhook kick not sent (%s); beat's poll delivers them", exc.__class__.__name__)
        return counts

    behind = StoreBehind(engine, store_and_announce)

    def run_batch(rows: Sequence[Job]) -> None:
        try:
            computed = execute.compute_batch(settings, engine, storage, rows)
        except TRANSIENT_ERRORS as exc:
            put_back(engine, rows, exc)
            raise
        behind.submit(rows, computed)

    def hand_over() -> None:
        publish_wakeups(app, [(task, None)])

    try:
        return drain(engine, settings, worker_id, task, bucket, run_batch, on_budget_spent=hand_over)
    finally:
        behind.close()


@shared_task(base=NexusGenTask, name=TASK_PROCESS, bind=True, ignore_result=True)
def process_queue(self: NexusGenTask, task: str, bucket: str | None = None) -> int:
    """Celery entry point of TASK_PROCESS(task, bucket); NexusGenTask retries transient errors."""
    return process(self.runtime, task, bucket)
