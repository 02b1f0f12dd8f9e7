"""Webhook outbox and signing: event rows in the caller's transaction, secrets, Standard Webhooks headers.

The delivery state machine (core/deliveries.py) moves the rows this module writes; the API and the CLI
use the secret helpers. Signing goes through the `standardwebhooks` package.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import Connection, func, select, update
from sqlalchemy.dialects.postgresql import insert
from standardwebhooks import Webhook

from core.ids import new_id
from core.queue import TASK_DELIVER, WEBHOOK_QUEUE
from core.records import JOB_PROGRESS_FIELDS, DeliveryStatus, EventType, Job, job_payload
from core.schema import tenants, webhook_deliveries, webhook_endpoints, webhook_events

# What a subscription without `events` gets: every event but job.progress.
DEFAULT_EVENTS: tuple[str, ...] = tuple(e.value for e in EventType if e is not EventType.JOB_PROGRESS)
ALL_EVENTS: tuple[str, ...] = tuple(event.value for event in EventType)
# At most one job.progress event per job in this many seconds.
PROGRESS_EVENT_INTERVAL_S = 5.0


def new_secret() -> str:
    """A fresh signing secret: `whsec_` + base64 of 32 random bytes (the Standard Webhooks format)."""
    return "whsec_" + base64.b64encode(os.urandom(32)).decode("ascii")


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
    """Write the event and a pending delivery to `url` if it subscribes; return the event id or None.

    A delivery to an endpoint disabled by a 410 is written as `disabled` (visible in the log, not sent).
    """
    if not url or not wants_event(event_type, events):
        return None
    event_id = new_id("msg")
    payload = {"type": event_type, "timestamp": datetime.now(UTC).isoformat(), "data": data}
    conn.execute(
        webhook_events.insert().values(
            id=event_id,
            tenant_id=tenant_id,
            type=event_type,
            payload=payload,
            job_id=job_id,
            batch_id=batch_id,
        )
    )
    endpoint_id = ensure_endpoint(conn, tenant_id, url)
    disabled = conn.execute(
        select(webhook_endpoints.c.disabled_at).where(webhook_endpoints.c.id == endpoint_id)
    ).scalar_one()
    conn.execute(
        webhook_deliveries.insert().values(
            id=new_id("whd"),
            event_id=event_id,
            endpoint_id=endpoint_id,
            tenant_id=tenant_id,
            job_id=job_id,
            status=DeliveryStatus.PENDING if disabled is None else DeliveryStatus.DISABLED,
            last_error=None if disabled is None else "endpoint disabled",
        )
    )
    return event_id


def enqueue_progress_event(conn: Connection, job: Job) -> str | None:
    """Write a job.progress event if the job asked for them and none was written in the last few seconds."""
    if not job.webhook_url or not wants_event(EventType.JOB_PROGRESS, job.webhook_events):
        return None
    # The delivery index (tenant_id, job_id) finds this job's events without scanning the outbox.
    recent = conn.execute(
        select(func.max(webhook_events.c.created_at))
        .select_from(
            webhook_deliveries.join(webhook_events, webhook_events.c.id == webhook_deliveries.c.event_id)
        )
        .where(
            webhook_deliveries.c.tenant_id == job.tenant_id,
            webhook_deliveries.c.job_id == job.id,
            webhook_events.c.type == EventType.JOB_PROGRESS,
            webhook_events.c.created_at > func.now() - timedelta(seconds=PROGRESS_EVENT_INTERVAL_S),
        )
    ).scalar()
    if recent is not None:
        return None
    return enqueue_event(
        conn,
        tenant_id=job.tenant_id,
        event_type=EventType.JOB_PROGRESS,
        data=job_payload(job, JOB_PROGRESS_FIELDS),
        url=job.webhook_url,
        events=job.webhook_events,
        job_id=job.id,
        batch_id=job.batch_id,
    )


def publish_delivery_kick(app: Celery) -> None:
    """Ask a webhook worker to deliver now; call after committing events (beat also polls the outbox)."""
    app.send_task(TASK_DELIVER, queue=WEBHOOK_QUEUE)


# --- secrets -------------------------------------------------------------------------------------------


def rotate_secret(conn: Connection, tenant_id: str, overlap_s: float = 86400) -> str:
    """Give the tenant a new signing secret; the old one keeps signing too for `overlap_s` seconds."""
    if overlap_s < 0:
        raise ValueError(f"overlap_s must be >= 0, got {overlap_s}")
    secret = new_secret()
    row = conn.execute(
        update(tenants)
        .where(tenants.c.id == tenant_id)
        .values(
            webhook_secret_previous=tenants.c.webhook_secret,
            webhook_secret_previous_expires_at=func.now() + timedelta(seconds=overlap_s),
            webhook_secret=secret,
        )
        .returning(tenants.c.id)
    ).first()
    if row is None:
        raise ValueError(f"no tenant {tenant_id!r}")
    return secret


def signing_secrets(conn: Connection, tenant_id: str) -> list[str]:
    """The tenant's current secret, then the previous one while its overlap lasts."""
    row = conn.execute(
        select(
            tenants.c.webhook_secret,
            tenants.c.webhook_secret_previous,
            tenants.c.webhook_secret_previous_expires_at > func.now(),
        ).where(tenants.c.id == tenant_id)
    ).first()
    if row is None:
        raise ValueError(f"no tenant {tenant_id!r}")
    current, previous, previous_valid = row
    return [current, previous] if previous and previous_valid else [current]


def sign_headers(
    secrets: Iterable[str], msg_id: str, body: str, timestamp: datetime | None = None
) -> dict[str, str]:
    """Standard Webhooks headers; one `v1,` signature per secret, space-separated (rotation overlap)."""
    when = timestamp or datetime.now(UTC)
    signatures = [Webhook(secret).sign(msg_id, when, body) for secret in secrets]
    if not signatures:
        raise ValueError("at least one signing secret is needed")
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": " ".join(signatures),
    }
