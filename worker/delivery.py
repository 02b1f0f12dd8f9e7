"""Webhook delivery from the outbox: claim due deliveries, sign, POST to the checked address, record attempts.

Runs on the CPU webhook workers (queue WEBHOOK_QUEUE), polled by beat and kicked after commits. Each
delivery is claimed with FOR UPDATE SKIP LOCKED plus a `locked_until` lease, sent on a small thread pool
with a whole-attempt deadline (counted from the claim, shorter than the lease) so a slow receiver only
holds its own thread; slots are shared round robin between tenants. A failure is recorded with a
conditional UPDATE that names the lease; a 2xx is recorded whatever became of the lease.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from collections.abc import Collection, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import timedelta
from typing import Any

from celery import shared_task
from sqlalchemy import Connection, Engine, RowMapping, func, or_, select, update
from sqlalchemy.exc import InterfaceError, OperationalError

from core.queue import TASK_DELIVER
from core.records import (
    RESULT_EVENT_IMAGE,
    RESULT_EVENT_TEXT,
    DeliveryStatus,
    EventType,
    JobResult,
    result_payload,
)
from core.schema import results, webhook_attempts, webhook_deliveries, webhook_endpoints, webhook_events
from core.settings import Settings
from core.ssrf import SendOutcome, WebhookURLRefused, post_to_checked_url, resolve_webhook_url
from core.storage import Storage
from core.webhooks import sign_headers, signing_secrets
from worker.runtime import NexusGenTask

log = logging.getLogger(__name__)

MAX_PARALLEL = 8  # attempts in flight per task
PER_ENDPOINT_LIMIT = 4  # of those, to one endpoint
PER_TENANT_LIMIT = 4  # of those, for one tenant (the other slots stay free for other tenants)
POLL_S = 0.5  # while attempts run, look for newly due deliveries this often
TASK_BUDGET_S = 60.0  # one task claims new deliveries for at most this long


def retry_delay(schedule: tuple[float, ...], attempts: int, rng: random.Random | None = None) -> float | None:
    """Seconds until the try after `attempts` failed ones (±20% jitter), or None when retries are spent."""
    if attempts > len(schedule):
        return None
    return float(schedule[attempts - 1]) * (rng or random).uniform(0.8, 1.2)


def claim_due(
    conn: Connection,
    *,
    limit: int,
    lock_s: float,
    exclude: Collection[str] = (),
    busy_endpoints: Mapping[str, int] | None = None,
    busy_tenants: Mapping[str, int] | None = None,
) -> list[RowMapping]:
    """Lease up to `limit` due pending deliveries with their event and endpoint, fairly between tenants.

    Candidates are taken round robin across tenants (each tenant's oldest due first), at most
    PER_ENDPOINT_LIMIT per endpoint and PER_TENANT_LIMIT per tenant counting the attempts already in
    flight (`busy_endpoints`, `busy_tenants`): one tenant with slow receivers, even behind several URLs,
    cannot take every slot. `exclude` skips deliveries already tried by the caller.
    """
    due = [
        webhook_deliveries.c.status == DeliveryStatus.PENDING,
        webhook_deliveries.c.next_attempt_at <= func.now(),
        or_(webhook_deliveries.c.locked_until.is_(None), webhook_deliveries.c.locked_until < func.now()),
    ]
    if exclude:
        due.append(webhook_deliveries.c.id.not_in(list(exclude)))
    turn = (
        func.row_number()
        .over(partition_by=webhook_deliveries.c.tenant_id, order_by=webhook_deliveries.c.next_attempt_at)
        .label("turn")
    )
    ranked = select(webhook_deliveries.c.id, turn).where(*due).subquery()
    # Row locks cannot sit on a windowed query: rank first, then lock the chosen rows (skipping taken ones).
    query = (
        select(webhook_deliveries.c.id, webhook_deliveries.c.endpoint_id, webhook_deliveries.c.tenant_id)
        .join(ranked, ranked.c.id == webhook_deliveries.c.id)
        .where(*due[:3])
        .order_by(ranked.c.turn, webhook_deliveries.c.next_attempt_at)
        .limit(limit * 4)
        .with_for_update(of=webhook_deliveries, skip_locked=True)
    )
    per_endpoint: dict[str, int] = dict(busy_endpoints or {})
    per_tenant: dict[str, int] = dict(busy_tenants or {})
    chosen: list[str] = []
    for delivery_id, endpoint_id, tenant_id in conn.execute(query).all():
        if len(chosen) >= limit:
            break
        if per_endpoint.get(endpoint_id, 0) >= PER_ENDPOINT_LIMIT:
            continue
        if per_tenant.get(tenant_id, 0) >= PER_TENANT_LIMIT:
            continue
        per_endpoint[endpoint_id] = per_endpoint.get(endpoint_id, 0) + 1
        per_tenant[tenant_id] = per_tenant.get(tenant_id, 0) + 1
        chosen.append(delivery_id)
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


def build_body(conn: Connection, settings: Settings, delivery: RowMapping, storage: Storage | None) -> str:
    """The JSON body: the stored payload with absolute links and, for results, a fresh presigned URL."""
    payload: dict[str, Any] = json.loads(json.dumps(delivery["payload"]))
    data = payload.get("data", {})
    base = settings.public_base_url.rstrip("/")
    links = data.get("links") or {}
    for name, link in list(links.items()):
        if isinstance(link, str) and link.startswith("/"):
            links[name] = base + link
    if delivery["event_type"] == EventType.JOB_SUCCEEDED and delivery["job_id"]:
        result = (
            conn.execute(select(results).where(results.c.job_id == delivery["job_id"])).mappings().first()
        )
        if result is not None:
            data["result"] = result_payload(
                JobResult.from_row(result),
                storage,
                settings.presign_ttl_s,
                fields=(RESULT_EVENT_TEXT, RESULT_EVENT_IMAGE),
            )
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def _finish(
    engine: Engine,
    delivery: RowMapping,
    outcome: SendOutcome,
    status: DeliveryStatus,
    next_in_s: float | None,
) -> None:
    """Record the attempt and move the delivery on.

    A failure moves it only if our lease still holds it. A 2xx is final whatever became of the lease:
    the receiver has the event, so a late answer still ends a pending (or dead) delivery `succeeded`.
    """
    attempt = delivery["attempts"] + 1
    with engine.begin() as conn:
        conn.execute(
            webhook_attempts.insert().values(
                delivery_id=delivery["id"],
                attempt=attempt,
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
        if status == DeliveryStatus.DISABLED:  # 410 Gone: the endpoint asked us to stop
            conn.execute(
                update(webhook_endpoints)
                .where(
                    webhook_endpoints.c.id == delivery["endpoint_id"],
                    webhook_endpoints.c.disabled_at.is_(None),
                )
                .values(disabled_at=func.now(), disabled_reason="the receiver answered 410 Gone")
            )
            conn.execute(
                update(webhook_deliveries)
                .where(
                    webhook_deliveries.c.endpoint_id == delivery["endpoint_id"],
                    webhook_deliveries.c.status == DeliveryStatus.PENDING,
                )
                .values(
                    status=DeliveryStatus.DISABLED,
                    locked_until=None,
                    last_error="endpoint disabled (410 Gone)",
                )
            )


def _record(
    engine: Engine,
    settings: Settings,
    delivery: RowMapping,
    outcome: SendOutcome,
    status: DeliveryStatus,
    next_in_s: float | None = None,
) -> None:
    """_finish, retried through a database outage while the claim lock lasts: an answer the receiver gave
    is not thrown away lightly (unrecorded, the event is sent again once the lock runs out)."""
    give_up = time.monotonic() + settings.webhook_lock_s - settings.webhook_timeout_s - 5
    delay = 0.5
    while True:
        try:
            _finish(engine, delivery, outcome, status, next_in_s)
            return
        except (OperationalError, InterfaceError) as exc:
            if time.monotonic() + delay > give_up:
                raise
            log.warning("recording a webhook attempt failed (%s); retrying", exc.__class__.__name__)
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


def deliver_one(
    engine: Engine,
    settings: Settings,
    delivery: RowMapping,
    storage: Storage | None = None,
    deadline: float | None = None,
) -> DeliveryStatus:
    """Attempt one claimed delivery and record it; return the delivery's new status.

    The attempt ends by `deadline` (time.monotonic(); default WEBHOOK_TIMEOUT_S from now), well inside
    the claim lock (Settings.webhook_lock_s), so no other worker can claim it while it is in flight.
    """
    if deadline is None:
        deadline = time.monotonic() + settings.webhook_timeout_s
    if delivery["disabled_at"] is not None:
        with engine.begin() as conn:
            conn.execute(
                update(webhook_deliveries)
                .where(
                    webhook_deliveries.c.id == delivery["id"],
                    webhook_deliveries.c.status == DeliveryStatus.PENDING,
                )
                .values(
                    status=DeliveryStatus.DISABLED,
                    locked_until=None,
                    last_error="endpoint disabled",
                    updated_at=func.now(),
                )
            )
        return DeliveryStatus.DISABLED
    with engine.connect() as conn:
        body = build_body(conn, settings, delivery, storage)
        secrets = signing_secrets(conn, delivery["tenant_id"])
    try:
        checked = resolve_webhook_url(delivery["url"], settings.webhook_allow_private_networks)
    except WebhookURLRefused as exc:
        outcome = SendOutcome.failure(f"{exc.reason}: {exc}")
        if exc.reason != "unresolvable_host":  # a policy refusal does not heal by retrying
            _record(engine, settings, delivery, outcome, DeliveryStatus.REFUSED)
            return DeliveryStatus.REFUSED
    else:
        headers = sign_headers(secrets, delivery["event_id"], body)
        outcome = post_to_checked_url(
            checked, body.encode("utf-8"), headers, settings.webhook_timeout_s, deadline=deadline
        )
    if outcome.status_code is not None and 200 <= outcome.status_code < 300:
        _record(engine, settings, delivery, outcome, DeliveryStatus.SUCCEEDED)
        return DeliveryStatus.SUCCEEDED
    if outcome.status_code == 410:
        _record(engine, settings, delivery, outcome, DeliveryStatus.DISABLED)
        return DeliveryStatus.DISABLED
    delay = retry_delay(settings.webhook_retry_schedule_s, delivery["attempts"] + 1)
    status = DeliveryStatus.PENDING if delay is not None else DeliveryStatus.DEAD
    _record(engine, settings, delivery, outcome, status, delay)
    return status


def deliver_due(
    engine: Engine,
    settings: Settings,
    *,
    max_parallel: int = MAX_PARALLEL,
    storage: Storage | None = None,
    budget_s: float | None = None,
) -> dict[str, int]:
    """Attempt every due delivery once, up to `max_parallel` at a time; return counts by new status.

    While attempts run, newly due deliveries are claimed as slots free up, so a slow receiver holds one
    slot rather than the whole round. Claiming stops after `budget_s` (if given); then in-flight ones end.
    """
    lock_s = settings.webhook_lock_s  # longer than one whole attempt, counted from the claim
    deadline = None if budget_s is None else time.monotonic() + budget_s
    counts: dict[str, int] = {}
    tried: set[str] = set()
    in_flight: dict[Future[DeliveryStatus], tuple[str, str]] = {}  # attempt -> (endpoint id, tenant id)
    with ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="webhook") as pool:
        while True:
            free = max_parallel - len(in_flight)
            if free > 0 and (deadline is None or time.monotonic() < deadline):
                with engine.begin() as conn:
                    claimed = claim_due(
                        conn,
                        limit=free,
                        lock_s=lock_s,
                        exclude=tried,
                        busy_endpoints=Counter(e for e, _ in in_flight.values()),
                        busy_tenants=Counter(t for _, t in in_flight.values()),
                    )
                claimed_at = time.monotonic()
                for delivery in claimed:
                    tried.add(delivery["id"])
                    attempt_deadline = claimed_at + settings.webhook_timeout_s
                    future = pool.submit(deliver_one, engine, settings, delivery, storage, attempt_deadline)
                    in_flight[future] = (delivery["endpoint_id"], delivery["tenant_id"])
            if not in_flight:
                return counts
            done, _ = wait(in_flight, timeout=POLL_S, return_when=FIRST_COMPLETED)
            for future in done:
                del in_flight[future]
                status = future.result()
                counts[status.value] = counts.get(status.value, 0) + 1


@shared_task(base=NexusGenTask, name=TASK_DELIVER, bind=True, ignore_result=True, autoretry_for=())
def deliver_webhooks(self: NexusGenTask) -> dict[str, int]:
    """Deliver due webhooks until none are left or the time budget is spent (beat polls again anyway)."""
    settings = self.settings
    storage = self.storage if settings.s3_endpoint_url else None
    counts = deliver_due(self.engine, settings, storage=storage, budget_s=TASK_BUDGET_S)
    if counts:
        log.info("webhook deliveries: %s", counts)
    return counts
