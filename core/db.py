"""Database engine and transactions: one SQLAlchemy engine per process, built from Settings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, create_engine

from core.settings import Settings


def normalize_url(url: str) -> str:
    """Use the psycopg 3 driver for plain postgresql:// URLs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(settings: Settings, pool_size: int = 5) -> Engine:
    """Create the engine; connections are checked before use so a restarted database is survived."""
    settings.require("database_url")
    assert settings.database_url is not None
    return create_engine(
        normalize_url(settings.database_url),
        pool_size=pool_size,
        max_overflow=10,
        pool_pre_ping=True,
        future=True,
    )


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction: commit on success, roll back on any exception."""
    with engine.begin() as conn:
        yield conn
