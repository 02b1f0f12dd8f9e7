"""Database engine and transactions: one SQLAlchemy engine per process, built from Settings."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, create_engine

from core.settings import Settings


def normalize_url(url: str) -> str:
    """Use the psycopg 3 driver for plain postgresql:// URLs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


# A number of 19 digits or more may not fit orjson's 64-bit integers, which it would read as a float.
_LONG_NUMBER = re.compile(rb"\d{19}")


def loads_json(document: bytes | str) -> Any:
    """A json/jsonb column's value: by orjson (a quarter of `json.loads`' CPU), except a document with a
    number that may exceed 64 bits (a tenant's metadata may hold one), which the standard library reads
    exactly, as it does whatever orjson refuses."""
    data = document.encode() if isinstance(document, str) else bytes(document)
    if _LONG_NUMBER.search(data) is None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)


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
        json_deserializer=loads_json,
        future=True,
    )


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction: commit on success, roll back on any exception."""
    with engine.begin() as conn:
        yield conn
