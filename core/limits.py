"""Per-tenant limits set by an admin (`nexusgen tenant set-limits`); an unset one follows the settings."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select, update

from core.schema import tenants
from core.settings import Settings

# Limit name -> the Settings field holding its default.
DEFAULTS = {"result_ttl_s": "result_ttl_s"}
LIMIT_NAMES = tuple(DEFAULTS)


def set_limits(conn: Connection, tenant_id: str, changes: dict[str, int | None]) -> None:
    """Store the tenant's own limits (None: back to the default)."""
    unknown = sorted(set(changes) - set(LIMIT_NAMES))
    if unknown:
        raise ValueError(f"unknown limits {unknown}; choose from {list(LIMIT_NAMES)}")
    for name, value in changes.items():
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if changes:
        conn.execute(update(tenants).where(tenants.c.id == tenant_id).values(**changes))


def tenant_limits(conn: Connection, tenant_id: str, settings: Settings) -> dict[str, tuple[Any, bool]]:
    """{limit: (effective value, whether the tenant has its own)}."""
    row = (
        conn.execute(select(*(tenants.c[n] for n in LIMIT_NAMES)).where(tenants.c.id == tenant_id))
        .mappings()
        .first()
    )
    if row is None:
        raise ValueError(f"no tenant {tenant_id!r}")
    return {
        n: (row[n], True) if row[n] is not None else (getattr(settings, DEFAULTS[n]), False)
        for n in LIMIT_NAMES
    }
