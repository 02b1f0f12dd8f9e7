"""Outbox writes: an event row and its pending deliveries, inside the caller's transaction."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.dialects.postgresql import insert

from core.ids import new_id
from core.schema import webhook_deliveries, webhook_endpoints, webhook_events

DEFAULT_EVENTS = ("job.succeeded", "job.failed", "job.canceled", "batch.completed")
ALL_EVENTS = (*DEFAULT_EVENTS, "job.progress")


def wants_event(event_type: str, events: list[str] | None) -> bool:
    """Whether a subscription (None = the default set) asks for this event type."""
    return event_type in (events if events else DEFAULT_EVENTS)


def ensure_endpoint(conn: Connection, tenant_id: str, url: str) -> str:
    """Return the id of the tenant's endpoint for `url`, creating it if needed."""
    stmt = (
        insert(webhook_endpoints)
        .values(id=new_id("whe"), tenant_id=tenant_id, url=url)
        .on_conflict_do_nothing(constraint="uq_webhook_endpoints_tenant_url")
    )
    conn.execute(stmt)
    row = conn.execute(
        select(webhook_endpoints.c.id).where(
            webhook_endpoints.c.tenant_id == tenant_id, webhook_endpoints.c.url == url
        )
    ).one()
    return str(row.id)


def enqueue_event(
    conn: Connection,
    *,
    tenant_id: str,
    event_type: str,
    data: dict[str, Any],
    url: str | None,
    events: list[str] | None = None,
    job_id: str | None = None,
    batch_id: str | None = None,
) -> str | None:
    """Write the event and a pending delivery to `url` if it subscribes; return the event id or None."""
    if not url or not wants_event(event_type, events):
        return None
    event_id = new_id("msg")
    payload = {"type": event_type, "timestamp": datetime.now(UTC).isoformat(), "data": data}
    conn.execute(
        webhook_events.insert().values(
            id=event_id, tenant_id=tenant_id, type=event_type, payload=payload, job_id=job_id, batch_id=batch_id
        )
    )
    endpoint_id = ensure_endpoint(conn, tenant_id, url)
    conn.execute(
        webhook_deliveries.insert().values(
            id=new_id("whd"), event_id=event_id, endpoint_id=endpoint_id, tenant_id=tenant_id, job_id=job_id
        )
    )
    return event_id
