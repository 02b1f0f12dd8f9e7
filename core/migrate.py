"""Run the Alembic migrations in migrations/ from code (`nexusgen migrate`, tests, `nexusgen up`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, pool, text

import migrations
from core.db import normalize_url
from core.schema import metadata
from core.settings import Settings

# Serialises concurrent `migrate` runs (several services starting at once) on one database.
_LOCK_ID = 0x6E657875  # "nexu"


def alembic_config(settings: Settings | None = None) -> Config:
    """An Alembic Config for the installed `migrations` package, pointed at settings.database_url."""
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    if settings is not None and settings.database_url:
        # ConfigParser interpolation: a literal % in a password must be doubled.
        config.set_main_option("sqlalchemy.url", normalize_url(settings.database_url).replace("%", "%%"))
    return config


def _run(settings: Settings, action: Any, revision: str) -> None:
    settings.require("database_url")
    assert settings.database_url is not None
    engine = create_engine(normalize_url(settings.database_url), poolclass=pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
            config = alembic_config(settings)
            config.attributes["connection"] = conn
            action(config, revision)
    finally:
        engine.dispose()


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Bring the database up to `revision` (default: the newest)."""
    _run(settings, command.upgrade, revision)


def downgrade(settings: Settings, revision: str = "base") -> None:
    """Take the database back to `revision` (default: empty)."""
    _run(settings, command.downgrade, revision)


def head_revision() -> str:
    """The newest revision in migrations/versions."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError("migrations/versions holds no revision")
    return head


def current_revision(conn: Connection) -> str | None:
    """The revision the database is at, or None when it was never migrated."""
    return MigrationContext.configure(conn).get_current_revision()


def schema_diff(conn: Connection) -> list[Any]:
    """Differences between the database and core.schema.metadata (empty when they match)."""
    context = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))
