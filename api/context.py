"""What request handlers share: settings, the engine, storage and the wake-up publisher of the app."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from flask import current_app
from kombu.exceptions import KombuError, OperationalError
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from core.queue import make_publisher, top_up
from core.settings import Settings
from core.storage import Storage

log = logging.getLogger("nexusgen.api")


@dataclass
class Services:
    settings: Settings
    engine: Engine
    storage: Storage
    reader: Engine  # autocommit, for the reads of GET requests (core.db.make_engine)
    _publisher: Celery | None = field(default=None, repr=False)

    def publisher(self) -> Celery:
        """The Celery app that sends wake-ups; it fails fast so a dead broker never stalls a request."""
        if self._publisher is None:
            app = make_publisher(self.settings)
            app.conf.broker_connection_timeout = 2
            app.conf.broker_transport_options = {"socket_connect_timeout": 2, "socket_timeout": 5}
            app.conf.task_publish_retry_policy = {
                "max_retries": 1,
                "interval_start": 0,
                "interval_step": 0.5,
                "interval_max": 0.5,
            }
            self._publisher = app
        return self._publisher

    def wake(self, pairs: Iterable[tuple[str, str | None]]) -> None:
        """After a commit, top the queues of these (task, bucket) pairs up to a ticket per batch; on a
        broker or database failure the jobs stay queued and the sweeper tops up, so the request succeeds."""
        tasks = {task for task, _ in pairs}
        if not tasks:
            return
        try:
            top_up(self.engine, self.publisher(), self.settings.max_batch, tasks)
        except (OperationalError, KombuError, SQLAlchemyError, OSError, RuntimeError) as exc:
            log.warning("tickets not sent (the sweeper tops the queues up): %s", exc)


def services() -> Services:
    found: Any = current_app.extensions["nexusgen"]
    return found
