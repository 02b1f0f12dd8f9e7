"""The Celery app, configured from Settings: queues, beat schedule, and the worker/beat entry points.

Nothing is built at import time. `make_celery(settings)` builds an app; `celery -A worker.app:celery_app ...`
gets one built lazily from `Settings.from_env()` (module `__getattr__`). Per-process resources (database
engine, object storage) are created on first use in the process that uses them, so a prefork child never
inherits its parent's connections, and the model is loaded only inside the child (worker.execute).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

from celery import Celery, signals
from sqlalchemy import Engine

from core.db import make_engine
from core.queue import MAINTENANCE_QUEUE, MODEL_QUEUES, TASK_DELIVER, TASK_SWEEP, WEBHOOK_QUEUE
from core.settings import Settings
from core.storage import Storage

TASK_MODULES = ("worker.tasks", "worker.sweeper", "worker.delivery", "worker.revoke")
WEBHOOK_POLL_S = 5.0  # beat asks a webhook worker to look at the outbox this often (commits also kick it)
PRELOAD_KEY = "nexusgen_preload_model"  # app.conf flag: pool processes load the model as they start


class NexusGenCelery(Celery):
    """A Celery app that carries the service Settings and this process's engine and storage.

    Tasks reach them through worker.runtime.NexusGenTask (`self.settings`, `self.engine`, ...).
    """

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__("nexusgen", **kwargs)
        self.settings = settings
        self._resources: dict[str, Any] = {}
        self._pid = os.getpid()

    def _resource(self, name: str, build: Any) -> Any:
        if self._pid != os.getpid():  # forked: the parent's connections are not ours
            self._resources = {}
            self._pid = os.getpid()
        if name not in self._resources:
            self._resources[name] = build()
        return self._resources[name]

    @property
    def engine(self) -> Engine:
        return self._resource("engine", lambda: make_engine(self.settings))  # type: ignore[no-any-return]

    @property
    def storage(self) -> Storage:
        return self._resource("storage", lambda: Storage.from_settings(self.settings))  # type: ignore[no-any-return]

    @property
    def worker_id(self) -> str:
        """Who holds a lease: host and process id (distinct per prefork child)."""
        return f"{socket.gethostname()}/{os.getpid()}"


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """The periodic tasks: the sweeper and the webhook outbox poll.

    A run nobody started within its period is superseded by the next one (`expires`).
    """
    return {
        "nexusgen-sweep": {
            "task": TASK_SWEEP,
            "schedule": timedelta(seconds=settings.sweep_interval_s),
            "options": {"queue": MAINTENANCE_QUEUE, "expires": settings.sweep_interval_s},
        },
        "nexusgen-deliver-webhooks": {
            "task": TASK_DELIVER,
            "schedule": WEBHOOK_POLL_S,
            "options": {"queue": WEBHOOK_QUEUE, "expires": WEBHOOK_POLL_S},
        },
    }


def model_queues(settings: Settings) -> list[str]:
    """The broker queues of the task families this worker serves (NEXUSGEN_TASKS)."""
    return [MODEL_QUEUES[task] for task in settings.tasks]


def _fail_on_cold_shutdown(sender: Any = None, **_: Any) -> None:
    """Make a cold shutdown (SIGQUIT) exit non-zero: celery means EX_FAILURE but its terminate() drops it.

    worker.ranks sends SIGQUIT when a tensor-parallel rank fails, and supervisors must see a failure.
    """

    def on_shutting_down(how: str = "", exitcode: int | None = None, **_: Any) -> None:
        if how == "Cold" and exitcode:
            sender.exitcode = exitcode

    signals.worker_shutting_down.connect(on_shutting_down, weak=False, dispatch_uid="nexusgen-cold-exit")


def make_celery(settings: Settings) -> NexusGenCelery:
    """Build the app: explicit task routes, late acks, one message at a time, prefork with one child."""
    settings.require("broker_url")
    if not 0 < settings.heartbeat_s < settings.lease_s:
        raise ValueError(
            f"NEXUSGEN_HEARTBEAT_S ({settings.heartbeat_s}) must be positive and below NEXUSGEN_LEASE_S "
            f"({settings.lease_s}), or leases run out between heartbeats"
        )
    signals.worker_init.connect(_fail_on_cold_shutdown, weak=False, dispatch_uid="nexusgen-worker-init")
    app = NexusGenCelery(
        settings, broker=settings.broker_url, backend=settings.result_backend, include=list(TASK_MODULES)
    )
    app.conf.update(
        task_acks_late=True,  # a message is acked only after its task ran: a killed worker loses nothing
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,  # one model process per GPU
        worker_pool="prefork",
        task_ignore_result=settings.result_backend is None,
        task_default_queue=MAINTENANCE_QUEUE,
        task_routes={TASK_SWEEP: {"queue": MAINTENANCE_QUEUE}, TASK_DELIVER: {"queue": WEBHOOK_QUEUE}},
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,  # Postgres leases decide
        worker_send_task_events=True,  # Flower lists every task with no -E flag anywhere
        task_send_sent_event=True,
        beat_schedule=beat_schedule(settings),
        timezone="UTC",
    )
    return app


def run_worker(
    settings: Settings,
    queues: list[str] | None = None,
    concurrency: int = 1,
    hostname: str | None = None,
    pool: str = "prefork",
    preload_model: bool = False,
) -> None:
    """Run a worker in the foreground on `queues` (default: the model queues of settings.tasks).

    With `preload_model`, each pool process loads the model as it starts (worker.tasks.preload_model).
    """
    app = make_celery(settings)
    app.conf[PRELOAD_KEY] = preload_model
    argv = [
        "worker",
        "--queues",
        ",".join(queues or model_queues(settings)),
        "--concurrency",
        str(concurrency),
        "--pool",
        pool,
        "--loglevel",
        "INFO",
    ]
    if hostname:
        argv += ["--hostname", hostname]
    app.worker_main(argv)


def run_beat(settings: Settings) -> None:
    """Run the beat scheduler in the foreground; its schedule file lives in the state directory."""
    app = make_celery(settings)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    app.start(["beat", "--schedule", str(settings.state_dir / "celerybeat-schedule"), "--loglevel", "INFO"])


_default_app: NexusGenCelery | None = None


def __getattr__(name: str) -> Any:
    """`worker.app.celery_app`: the app built from the environment, on first access only."""
    global _default_app
    if name != "celery_app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _default_app is None:
        _default_app = make_celery(Settings.from_env())
    return _default_app
