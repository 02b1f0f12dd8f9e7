"""The webhook delivery state machine: claim due deliveries, record attempts, stop an endpoint on 410.

A delivery (core.records.DeliveryStatus) moves only through the functions here, each a conditional
UPDATE in the caller's transaction:

    pending --2xx--> succeeded            dead --late 2xx--> succeeded  (the receiver has the event)
    pending --failure, retries left--> pending (next_attempt_at moves on the schedule)
    pending --failure, schedule spent--> dead
    pending --URL refused by policy--> refused
    pending --410, or its endpoint disabled--> disabled  (a 410 disables every pending one of the endpoint)
    any --redeliver (API)--> pending, attempts 0

A claim leases a pending due delivery with `locked_until`; a failure is recorded only while that lease
still holds it, a 2xx whatever became of the lease. The worker (worker/delivery.py) does the sending.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, RowMapping, func, select, text, update

from core.records import DeliveryStatus
from core.schema import webhook_attempts, webhook_deliveries, webhook_endpoints, webhook_events
from core.sender import SendOutcome

PER_ENDPOINT_LIMIT = 4  # attempts in flight to one endpoint
PER_TENANT_LIMIT = 4  # attempts in flight for one tenant (the other slots stay free for other tenants)
_CLAIM_LOCK = "nexusgen.webhook_claim"  # advisory lock key (hashed) that serialises claims


def retry_delay(schedule: tuple[float, ...], attempts: int, rng: random.Random | None = None) -> float | None:
    """Seconds until the try after `attempts` failed ones (±20% jitter), or None when retries are spent."""
    if attempts > len(schedule):
        return None
    return float(schedule[attempts - 1]) * (rng or random).uniform(0.8, 1.2)


def next_status(
    outcome: SendOutcome, attempts: int, schedule: tuple[float, ...]
) -> tuple[DeliveryStatus, float | None]:
    """Where an attempt's outcome takes a delivery that had `attempts` before it: (status, retry in s)."""
    if outcome.status_code is not None and 200 <= outcome.status_code < 300:
        return DeliveryStatus.SUCCEEDED, None
    if outcome.status_code == 410:
        return DeliveryStatus.DISABLED, None
    delay = retry_delay(schedule, attempts + 1)
    return (DeliveryStatus.PENDING if delay is not None else DeliveryStatus.DEAD), delay


# Attempts in flight now, by any worker: pending with a live lease. Read from ix_webhook_deliveries_leased
# (pending rows with a lease), so it touches the leased rows only, however many deliveries are due. A
# leased delivery was due when claimed and its next_attempt_at moves only when the attempt is recorded.
_IN_FLIGHT = text(
    """
    SELECT endpoint_id, tenant_id, count(*) FROM webhook_deliveries
    WHERE status = 'pending' AND locked_until > now() AND next_attempt_at <= now()
    GROUP BY endpoint_id, tenant_id
    """
)

# A claim's candidates, in claim order: each tenant's oldest due, unleased deliveries, tenants in turn.
# - `tenants`: the tenants with pending deliveries, one probe of ix_webhook_deliveries_pending each (a
#   loose index scan: the next tenant_id after the last one), so no row of a tenant's backlog is read;
# - per tenant (tenants at their cap passed over), its first PER_TENANT_LIMIT due deliveries in due order
#   (one range of the same index; endpoints at their cap passed over): no claim can take more of one
#   tenant, and an endpoint belongs to one tenant (PER_ENDPOINT_LIMIT >= PER_TENANT_LIMIT: the tenant's
#   cap binds first), so these are every row that ranking all due rows could give the claim;
# - `turn`: the delivery's place in its tenant's line; claim order is turn, then due time (round robin);
# - the first `limit` in claim order are locked by primary key: a row another transaction holds (one
#   changing its state) is skipped, and the due conditions are checked again on each row locked.
# So a claim reads a few rows per tenant with pending deliveries, whatever the number due.
_CANDIDATES = text(
    """
    WITH RECURSIVE tenants AS (
        (SELECT tenant_id FROM webhook_deliveries WHERE status = 'pending' ORDER BY tenant_id LIMIT 1)
        UNION ALL
        SELECT (
            SELECT d.tenant_id FROM webhook_deliveries AS d
            WHERE d.status = 'pending' AND d.tenant_id > t.tenant_id ORDER BY d.tenant_id LIMIT 1
        )
        FROM tenants AS t WHERE t.tenant_id IS NOT NULL
    ), heads AS (
        SELECT h.id, h.tenant_id, h.next_attempt_at,
               row_number() OVER (PARTITION BY h.tenant_id ORDER BY h.next_attempt_at) AS turn
        FROM tenants AS t CROSS JOIN LATERAL (
            SELECT d.id, d.tenant_id, d.next_attempt_at FROM webhook_deliveries AS d
            WHERE d.tenant_id = t.tenant_id AND d.status = 'pending' AND d.next_attempt_at <= now()
              AND (d.locked_until IS NULL OR d.locked_until < now())
              AND d.id <> ALL(CAST(:exclude AS varchar[]))
              AND d.endpoint_id <> ALL(CAST(:full_endpoints AS varchar[]))
            ORDER BY d.next_attempt_at LIMIT :per_tenant
        ) AS h
        WHERE t.tenant_id IS NOT NULL AND t.tenant_id <> ALL(CAST(:full_tenants AS varchar[]))
    ), first AS (
        SELECT id, turn, next_attempt_at FROM heads ORDER BY turn, next_attempt_at LIMIT :limit
    )
    SELECT w.id, w.endpoint_id, w.tenant_id FROM first JOIN webhook_deliveries AS w USING (id)
    WHERE w.status = 'pending' AND w.next_attempt_at <= now()
      AND (w.locked_until IS NULL OR w.locked_until < now())
    ORDER BY first.turn, first.next_attempt_at
    FOR UPDATE OF w SKIP LOCKED
    """
)


def _in_flight(conn: Connection) -> tuple[Counter[str], Counter[str]]:
    """Attempts in flight now, by any worker: (per endpoint, per tenant)."""
    per_endpoint: Counter[str] = Counter()
    per_tenant: Counter[str] = Counter()
    for endpoint_id, tenant_id, n in conn.execute(_IN_FLIGHT).all():
        per_endpoint[endpoint_id] += n
        per_tenant[tenant_id] += n
    return per_endpoint, per_tenant


def claim_due(
    conn: Connection, *, limit: int, lock_s: float, exclude: Collection[str] = ()
) -> list[RowMapping]:
    """Lease up to `limit` due pending deliveries with their event and endpoint, fairly between tenants.

    Candidates are taken round robin across tenants (each tenant's oldest due first), at most
    PER_ENDPOINT_LIMIT per endpoint and PER_TENANT_LIMIT per tenant counting the attempts every worker
    has in flight: one tenant with slow receivers, even behind several URLs and several webhook
    workers, cannot take every slot. Claims are serialised by a transaction-scoped advisory lock, so the
    count each claim reads includes every claim committed before it; a claim reads the leased rows and a
    few due rows per tenant (_CANDIDATES): a couple of milliseconds of database time at any depth.
    `exclude` skips deliveries already tried by the caller.
    """
    conn.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(_CLAIM_LOCK, 0))))
    per_endpoint, per_tenant = _in_flight(conn)
    candidates = conn.execute(
        _CANDIDATES,
        {
            "exclude": list(exclude),
            "full_tenants": [t for t, n in per_tenant.items() if n >= PER_TENANT_LIMIT],
            "full_endpoints": [e for e, n in per_endpoint.items() if n >= PER_ENDPOINT_LIMIT],
            "per_tenant": PER_TENANT_LIMIT,
            "limit": limit * 4,
        },
    ).all()
    chosen = within_caps(candidates, per_endpoint, per_tenant, limit)
    return lease(conn, chosen, lock_s)


def within_caps(
    candidates: Iterable[Sequence[Any]], per_endpoint: Counter[str], per_tenant: Counter[str], limit: int
) -> list[str]:
    """The first `limit` of (delivery id, endpoint id, tenant id) candidates that keep their endpoint and
    tenant within PER_ENDPOINT_LIMIT and PER_TENANT_LIMIT, counting those in flight; updates the counts."""
    chosen: list[str] = []
    for delivery_id, endpoint_id, tenant_id in candidates:
        if len(chosen) >= limit:
            break
        if per_endpoint[endpoint_id] >= PER_ENDPOINT_LIMIT or per_tenant[tenant_id] >= PER_TENANT_LIMIT:
            continue
        per_endpoint[endpoint_id] += 1
        per_tenant[tenant_id] += 1
        chosen.append(delivery_id)
    return chosen


def lease(conn: Connection, chosen: list[str], lock_s: float) -> list[RowMapping]:
    """Lease the `chosen` deliveries for `lock_s`; them with their event and endpoint, oldest due first."""
    if not chosen:
        return []
    conn.execute(
        update(webhook_deliveries)
        .where(webhook_deliveries.c.id.in_(chosen))
        .values(locked_until=func.now() + timedelta(seconds=lock_s))
    )
    return list(
        conn.execute(
            select(
                webhook_deliveries,
                webhook_events.c.payload,
                webhook_events.c.type.label("event_type"),
                webhook_endpoints.c.url,
                webhook_endpoints.c.disabled_at,
            )
            .join(webhook_events, webhook_events.c.id == webhook_deliveries.c.event_id)
            .join(webhook_endpoints, webhook_endpoints.c.id == webhook_deliveries.c.endpoint_id)
            .where(webhook_deliveries.c.id.in_(chosen))
            .order_by(webhook_deliveries.c.next_attempt_at)
        )
        .mappings()
        .all()
    )


def record_attempt(
    conn: Connection,
    delivery: RowMapping,
    outcome: SendOutcome,
    status: DeliveryStatus,
    next_in_s: float | None = None,
) -> None:
    """Record the attempt on a claimed delivery and move the delivery to `status`.

    A failure moves it only if our lease still holds it. A 2xx is final whatever became of the lease:
    the receiver has the event, so a late answer still ends a pending (or dead) delivery `succeeded`.
    A 410 (`status` disabled) also disables the endpoint and its other pending deliveries.
    """
    conn.execute(
        webhook_attempts.insert().values(
            delivery_id=delivery["id"],
            attempt=delivery["attempts"] + 1,
            started_at=outcome.started_at,
            status_code=outcome.status_code,
            latency_ms=outcome.latency_ms,
            error=outcome.error,
            response_excerpt=outcome.excerpt,
        )
    )
    values: dict[str, Any] = {
        "status": status,
        "attempts": webhook_deliveries.c.attempts + 1,
        "locked_until": None,
        "last_status_code": outcome.status_code,
        "last_error": outcome.error,
        "updated_at": func.now(),
    }
    if next_in_s is not None:
        values["next_attempt_at"] = func.now() + timedelta(seconds=next_in_s)
    ours = [webhook_deliveries.c.id == delivery["id"]]
    if status == DeliveryStatus.SUCCEEDED:
        values["delivered_at"] = func.now()
        ours.append(webhook_deliveries.c.status.in_((DeliveryStatus.PENDING, DeliveryStatus.DEAD)))
    else:
        ours += [
            webhook_deliveries.c.status == DeliveryStatus.PENDING,
            webhook_deliveries.c.locked_until == delivery["locked_until"],
        ]
    conn.execute(update(webhook_deliveries).where(*ours).values(**values))
    if status == DeliveryStatus.DISABLED:
        disable_endpoint(conn, delivery["endpoint_id"])


def disable_endpoint(conn: Connection, endpoint_id: str) -> None:
    """The receiver answered 410 Gone: disable the endpoint and every pending delivery to it.

    Events written later for a disabled endpoint are born `disabled` (core.webhooks.enqueue_event);
    `redeliver` enables the endpoint again.
    """
    conn.execute(
        update(webhook_endpoints)
        .where(webhook_endpoints.c.id == endpoint_id, webhook_endpoints.c.disabled_at.is_(None))
        .values(disabled_at=func.now(), disabled_reason="the receiver answered 410 Gone")
    )
    conn.execute(
        update(webhook_deliveries)
        .where(
            webhook_deliveries.c.endpoint_id == endpoint_id,
            webhook_deliveries.c.status == DeliveryStatus.PENDING,
        )
        .values(status=DeliveryStatus.DISABLED, locked_until=None, last_error="endpoint disabled (410 Gone)")
    )


def skip_disabled(conn: Connection, delivery_id: str) -> None:
    """A claimed delivery whose endpoint was disabled meanwhile: end it `disabled` without an attempt."""
    conn.execute(
        update(webhook_deliveries)
        .where(webhook_deliveries.c.id == delivery_id, webhook_deliveries.c.status == DeliveryStatus.PENDING)
        .values(
            status=DeliveryStatus.DISABLED,
            locked_until=None,
            last_error="endpoint disabled",
            updated_at=func.now(),
        )
    )


def redeliver(conn: Connection, tenant_id: str, delivery_id: str) -> RowMapping | None:
    """Reset a delivery to pending with a fresh retry schedule (same event, same webhook-id).

    Re-enables its endpoint if a 410 had disabled it (the tenant asked explicitly). Returns the delivery
    row, or None if the tenant has no such delivery. Raises ValueError while an attempt is in flight.
    """
    current = (
        conn.execute(
            select(webhook_deliveries, (webhook_deliveries.c.locked_until > func.now()).label("in_flight"))
            .where(webhook_deliveries.c.id == delivery_id, webhook_deliveries.c.tenant_id == tenant_id)
            .with_for_update()
        )
        .mappings()
        .first()
    )
    if current is None:
        return None
    if current["status"] == DeliveryStatus.PENDING and current["in_flight"]:
        raise ValueError("an attempt of this delivery is in flight; try again later")
    conn.execute(
        update(webhook_endpoints)
        .where(webhook_endpoints.c.id == current["endpoint_id"], webhook_endpoints.c.disabled_at.is_not(None))
        .values(disabled_at=None, disabled_reason=None)
    )
    return (
        conn.execute(
            update(webhook_deliveries)
            .where(webhook_deliveries.c.id == delivery_id)
            .values(
                status=DeliveryStatus.PENDING,
                attempts=0,
                next_attempt_at=func.now(),
                locked_until=None,
                last_error=None,
                updated_at=func.now(),
            )
            .returning(*webhook_deliveries.c)
        )
        .mappings()
        .one()
    )
