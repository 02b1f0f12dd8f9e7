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

from core.queue import make_publisher, publish_wakeups
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
        """Publish one wake-up per (task, bucket) after a commit; on a broker failure the jobs stay queued
        and the sweeper re-publishes them, so the request still succeeds."""
        pairs = list(pairs)
        if not pairs:
            return
        try:
            publish_wakeups(self.publisher(), pairs)
        except (OperationalError, KombuError, OSError, RuntimeError) as exc:
            log.warning("wake-ups not sent (the sweeper re-publishes queued jobs): %s", exc)


def services() -> Services:
    found: Any = current_app.extensions["nexusgen"]
    return found
