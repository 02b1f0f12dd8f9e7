"""The one runtime of every nexusgen task: settings, engine, storage and worker id, and the retry policy.

Every task is declared `@shared_task(base=NexusGenTask, ...)` and reads what it needs from `self`; the
resources are the app's (worker.app.NexusGenCelery), built once per process after the prefork fork.
"""

from __future__ import annotations

from typing import Any

import urllib3.exceptions
from celery import Task
from kombu.exceptions import OperationalError as BrokerError
from minio.error import ServerError as S3ServerError
from sqlalchemy import Engine
from sqlalchemy.exc import InterfaceError, OperationalError

from core.settings import Settings
from core.storage import Storage
from worker.app import NexusGenCelery

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


class NexusGenTask(Task):  # type: ignore[misc]  # celery ships no type hints
    """Base of every nexusgen task: its resources, and a retry of transient infrastructure errors only.

    Retries wait 1, 2, 4 ... seconds, at most 60, up to 20 times. A task that is redone by the next beat
    anyway (the sweep, the webhook poll) opts out with `autoretry_for=()`.
    """

    autoretry_for = TRANSIENT_ERRORS
    max_retries = 20
    retry_backoff = 1
    retry_backoff_max = 60
    retry_jitter = False

    @property
    def runtime(self) -> NexusGenCelery:
        """The app that holds this process's resources (tasks run only on worker.app.make_celery's app)."""
        app: Any = self.app
        if not isinstance(app, NexusGenCelery):
            raise RuntimeError("nexusgen tasks must run on worker.app.make_celery's app")
        return app

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    @property
    def engine(self) -> Engine:
        return self.runtime.engine

    @property
    def storage(self) -> Storage:
        return self.runtime.storage

    @property
    def worker_id(self) -> str:
        return self.runtime.worker_id
