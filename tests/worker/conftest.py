"""Fixtures for worker tests: object storage, the broker, a tenant, and real Celery worker processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Engine

from core.settings import Settings
from core.storage import Storage
from tests.worker.support import WorkerProcess, make_tenant, warm


@pytest.fixture(scope="session")
def storage(settings: Settings) -> Storage:
    store = Storage.from_settings(settings)
    store.ensure_bucket()
    return store


@pytest.fixture(scope="session")
def broker(settings: Settings) -> redis.Redis:
    """A client of the test broker (to flush it, or count waiting messages)."""
    assert settings.broker_url is not None
    return redis.Redis.from_url(settings.broker_url)


@pytest.fixture
def tenant(engine: Engine, clean_db: Any) -> str:
    """A tenant in an emptied database."""
    return make_tenant(engine)


@pytest.fixture(scope="module")
def start_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real `celery worker` processes on demand (module-scoped: the model loads once per worker)."""
    log_dir = Path(tmp_path_factory.mktemp("workers"))
    started: list[WorkerProcess] = []

    def start(settings: Settings, name: str, preload: bool = False, **kwargs: Any) -> WorkerProcess:
        """`preload`: send it one ticket, so that it loads the model before the test needs it."""
        worker = WorkerProcess(settings, name, log_dir, **kwargs)
        started.append(worker)
        worker.wait_ready()
        if preload:
            warm(settings, worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def dump_logs(workers: list[WorkerProcess]) -> str:
    return "\n".join(f"--- {w.name} ---\n{w.tail()}" for w in workers)
