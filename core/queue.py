"""Queue and task names shared by the API and the workers, and the wake-up publisher."""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery

from core.settings import Settings

# One queue per task family so that generation, editing and understanding workers scale apart.
MODEL_QUEUES = {"generate": "nexusgen.generate", "edit": "nexusgen.edit", "understand": "nexusgen.understand"}
WEBHOOK_QUEUE = "nexusgen.webhooks"
MAINTENANCE_QUEUE = "nexusgen.maintenance"

# Celery task names (explicit strings; tasks take ids, never objects).
TASK_PROCESS = "nexusgen.process_queue"  # args: (task kind, bucket or None)
TASK_SWEEP = "nexusgen.sweep"
TASK_DELIVER = "nexusgen.deliver_webhooks"


def make_publisher(settings: Settings) -> Celery:
    """A Celery app used only to send messages (the API never imports worker/)."""
    settings.require("broker_url")
    app = Celery("nexusgen-publisher", broker=settings.broker_url)
    app.conf.broker_connection_retry_on_startup = True
    return app


def publish_wakeups(app: Celery, tasks: Iterable[tuple[str, str | None]]) -> int:
    """Send one wake-up per distinct (task kind, bucket); call only after the jobs are committed."""
    sent = 0
    for task, bucket in sorted(set(tasks), key=lambda x: (x[0], x[1] or "")):
        app.send_task(TASK_PROCESS, args=[task, bucket], queue=MODEL_QUEUES[task])
        sent += 1
    return sent
