"""Database engine and transactions: one SQLAlchemy engine per process, built from Settings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, create_engine

from core import fast_json
from core.settings import Settings


def normalize_url(url: str) -> str:
    """Use the psycopg 3 driver for plain postgresql:// URLs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(
    settings: Settings,
    pool_size: int = 5,
    *,
    autocommit: bool = False,
    max_overflow: int = 10,
    pool_timeout_s: float = 30.0,
) -> Engine:
    """Create the engine; connections are checked before use so a restarted database is survived.

    `autocommit`: for single-statement reads, which then cost one round trip instead of five (the
    pre-ping, BEGIN, the statement, ROLLBACK); such an engine must not be used for writes that belong
    together. It is not pre-pinged: after a database restart a stale connection fails its statement,
    the pool drops every connection of before the restart, and that request alone answers 503.
    `pool_timeout_s`: how long a caller waits for a free connection before the pool raises its TimeoutError.
    """
    settings.require("database_url")
    assert settings.database_url is not None
    return create_engine(
        normalize_url(settings.database_url),
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout_s,
        pool_pre_ping=not autocommit,
        isolation_level="AUTOCOMMIT" if autocommit else "READ COMMITTED",
        json_deserializer=fast_json.loads,
        future=True,
    )


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction: commit on success, roll back on any exception."""
    with engine.begin() as conn:
        yield conn
