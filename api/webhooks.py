"""Webhook delivery log and replay: GET /v1/webhook-deliveries, POST /v1/webhook-deliveries/{id}/redeliver."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from apiflask import APIBlueprint
from flask import Response, request
from kombu.exceptions import KombuError, OperationalError
from sqlalchemy import Connection, RowMapping, select

from api.auth import auth, current_principal
from api.context import services
from api.errors import fail
from api.idempotency import Created, create_idempotently
from core.deliveries import redeliver
from core.records import DeliveryStatus
from core.schema import webhook_attempts, webhook_deliveries, webhook_endpoints, webhook_events
from core.webhooks import publish_delivery_kick

log = logging.getLogger("nexusgen.api")

bp = APIBlueprint("webhooks", __name__, tag="Webhooks")

MAX_LIMIT = 200


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _delivery_query() -> Any:
    return (
        select(
            webhook_deliveries,
            webhook_events.c.type.label("event_type"),
            webhook_events.c.batch_id,
            webhook_endpoints.c.url,
            webhook_endpoints.c.disabled_at.label("endpoint_disabled_at"),
        )
        .join(webhook_events, webhook_events.c.id == webhook_deliveries.c.event_id)
        .join(webhook_endpoints, webhook_endpoints.c.id == webhook_deliveries.c.endpoint_id)
    )


def _with_attempts(conn: Connection, rows: Sequence[RowMapping]) -> list[dict[str, Any]]:
    """The delivery objects of the API, each with its attempt log (oldest first)."""
    ids = [row["id"] for row in rows]
    log_by_id: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    if ids:
        attempts = conn.execute(
            select(webhook_attempts)
            .where(webhook_attempts.c.delivery_id.in_(ids))
            .order_by(webhook_attempts.c.delivery_id, webhook_attempts.c.id)
        ).mappings()
        for a in attempts:
            log_by_id[a["delivery_id"]].append(
                {
                    "attempt": a["attempt"],
                    "started_at": _iso(a["started_at"]),
                    "status_code": a["status_code"],
                    "latency_ms": a["latency_ms"],
                    "error": a["error"],
                    "response_excerpt": a["response_excerpt"],
                }
            )
    return [
        {
            "id": row["id"],
            "object": "webhook_delivery",
            "event_id": row["event_id"],
            "event_type": row["event_type"],
            "job_id": row["job_id"],
            "batch_id": row["batch_id"],
            "url": row["url"],
            "endpoint_disabled": row["endpoint_disabled_at"] is not None,
            "status": row["status"],
            "attempts": row["attempts"],
            "next_attempt_at": (
                _iso(row["next_attempt_at"]) if row["status"] == DeliveryStatus.PENDING else None
            ),
            "last_status_code": row["last_status_code"],
            "last_error": row["last_error"],
            "created_at": _iso(row["created_at"]),
            "updated_at": _iso(row["updated_at"]),
            "delivered_at": _iso(row["delivered_at"]),
            "attempt_log": log_by_id[row["id"]],
        }
        for row in rows
    ]


@bp.get("/v1/webhook-deliveries")
@bp.auth_required(auth, roles=["read"])
@bp.doc(
    summary="List webhook deliveries",
    description="Newest first, each with its attempts. Filters: `job_id`, `status` "
    f"({', '.join(DeliveryStatus)}); paging: `limit` (1-{MAX_LIMIT}) and `cursor` "
    "(the previous page's `next_cursor`).",
)
def list_deliveries() -> dict[str, Any]:
    tenant_id = current_principal().tenant_id
    status = request.args.get("status")
    if status is not None and status not in list(DeliveryStatus):
        statuses = [s.value for s in DeliveryStatus]
        fail(422, "validation_error", f"status must be one of {statuses}", {"status": status})
    try:
        limit = int(request.args.get("limit", "50"))
    except ValueError:
        fail(422, "validation_error", "limit must be an integer", {"limit": request.args.get("limit")})
    if not 1 <= limit <= MAX_LIMIT:
        fail(422, "validation_error", f"limit must be between 1 and {MAX_LIMIT}", {"limit": limit})
    query = _delivery_query().where(webhook_deliveries.c.tenant_id == tenant_id)
    if job_id := request.args.get("job_id"):
        query = query.where(webhook_deliveries.c.job_id == job_id)
    if status is not None:
        query = query.where(webhook_deliveries.c.status == status)
    if cursor := request.args.get("cursor"):
        query = query.where(webhook_deliveries.c.id < cursor)
    with services().engine.connect() as conn:
        rows = conn.execute(query.order_by(webhook_deliveries.c.id.desc()).limit(limit + 1)).mappings().all()
        page = _with_attempts(conn, rows[:limit])
    return {"object": "list", "data": page, "next_cursor": page[-1]["id"] if len(rows) > limit else None}


@bp.post("/v1/webhook-deliveries/<delivery_id>/redeliver")
@bp.auth_required(auth, roles=["submit"])
@bp.doc(
    summary="Redeliver a webhook",
    description="Reset the delivery to pending with a fresh retry schedule; the event and its webhook-id "
    "stay the same. Re-enables an endpoint that a 410 had disabled. 409 while an attempt is in flight. "
    "Accepts an Idempotency-Key (a replayed key answers the first response and resets nothing).",
)
def redeliver_delivery(delivery_id: str) -> Response:
    tenant_id = current_principal().tenant_id

    def work(conn: Connection, _: None) -> Created:
        try:
            row = redeliver(conn, tenant_id, delivery_id)
        except ValueError as exc:
            fail(409, "conflict", str(exc))
        if row is None:
            fail(404, "not_found", f"no webhook delivery {delivery_id!r}")
        rows = conn.execute(_delivery_query().where(webhook_deliveries.c.id == delivery_id)).mappings().all()
        return Created(200, _with_attempts(conn, rows)[0])

    response = create_idempotently(tenant_id, b"", lambda: None, work, lambda _: None)
    try:  # after the commit; beat's poll delivers it anyway if the broker is away
        publish_delivery_kick(services().publisher())
    except (OperationalError, KombuError, OSError, RuntimeError) as exc:
        log.warning("webhook delivery kick not sent (beat will poll): %s", exc)
    return response
