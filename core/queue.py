"""Queue and task names shared by the API and the workers, and the batch-ticket top-up.

A model queue holds one `nexusgen.run_batch` message ("ticket") per batch its queued jobs make; the jobs
themselves stay in Postgres and are claimed by the task that runs a ticket. So the broker's depth of a
model queue is its backlog in batches (what Flower's broker view shows), and a lost or duplicated ticket
loses or duplicates nothing: the next top-up re-publishes a missing one, a spare one claims nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery
from sqlalchemy import Connection, Engine

from core.counts import bucket_depths
from core.settings import Settings

# One queue per task family so that generation, editing and understanding workers scale apart.
MODEL_QUEUES = {"generate": "nexusgen.generate", "edit": "nexusgen.edit", "understand": "nexusgen.understand"}
WEBHOOK_QUEUE = "nexusgen.webhooks"
MAINTENANCE_QUEUE = "nexusgen.maintenance"

# Celery task names (explicit strings; tasks take ids, never objects).
TASK_RUN_BATCH = "nexusgen.run_batch"  # args: (task kind, preferred bucket or None); claims when it starts
TASK_SWEEP = "nexusgen.sweep"
TASK_DELIVER = "nexusgen.deliver_webhooks"

# A top-up publishes at most this many tickets, so its cost does not grow with the backlog (a ticket
# costs about 1 ms to publish, 6 ms on a loaded machine: 2,000 made a sweep take 2.3 s at 1M queued).
# Each request, each finished batch and each sweep (every sweep_interval_s) tops up, so the broker's
# depth catches up with a large backlog while the workers drain it.
TOP_UP_MAX_PUBLISH = 64
SWEEP_MAX_PUBLISH = TOP_UP_MAX_PUBLISH
# A model queue holds at most this many tickets: far more than workers take at once, so none idles while
# jobs wait, and a deep backlog (125,000 batches at 1M jobs) costs no publishing once the queue is full.
# The backlog itself is counted in Postgres (/metrics, KEDA), not by the broker.
MAX_TICKETS = 1_000


def make_publisher(settings: Settings) -> Celery:
    """A Celery app used only to send messages (the API never imports worker/)."""
    settings.require("broker_url")
    app = Celery("nexusgen-publisher", broker=settings.broker_url)
    app.conf.broker_connection_retry_on_startup = True
    app.conf.task_send_sent_event = True  # Flower shows when a ticket was published
    return app


def claimable_batches(conn: Connection, task: str, max_batch: int) -> int:
    """How many model batches the queued jobs of `task` make: ceil(queued / max_batch) per bucket.

    Read from the bucket rollup of the job counters (core.counts), so it costs the same at any depth.
    """
    return sum(-(-n // max_batch) for n in bucket_depths(conn, task).values())


def queue_depth(app: Celery, queue: str) -> int:
    """Messages waiting in a broker queue (not those a worker holds); 0 for a queue not declared yet."""
    with app.connection_for_write() as conn:
        try:
            return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)
        except conn.channel_errors:  # RabbitMQ: NOT_FOUND until the first publish declares it
            return 0


def top_up(
    engine: Engine,
    app: Celery,
    max_batch: int,
    tasks: Iterable[str],
    max_publish: int = TOP_UP_MAX_PUBLISH,
    max_tickets: int = MAX_TICKETS,
) -> int:
    """Publish `run_batch` tickets until each task's queue holds one per claimable batch (at most
    `max_tickets`); returns how many.

    Call only after the jobs are committed. Two top-ups racing may publish a spare ticket; it claims
    nothing (or the next batch) when it runs, so the depth drifts by at most a batch and never loses one.
    """
    sent = 0
    for task in sorted(set(tasks)):
        with engine.connect() as conn:
            needed = min(claimable_batches(conn, task, max_batch), max_tickets)
        queue = MODEL_QUEUES[task]
        missing = min(needed - queue_depth(app, queue), max_publish - sent) if needed else 0
        if missing <= 0:
            continue
        with app.producer_or_acquire() as producer:
            for _ in range(missing):
                app.send_task(TASK_RUN_BATCH, args=[task, None], queue=queue, producer=producer)
        sent += missing
    return sent
