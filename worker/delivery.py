"""Webhook delivery from the outbox: claim due deliveries, sign, POST to the checked address, record attempts.

Runs on the CPU webhook workers (queue WEBHOOK_QUEUE), polled by beat and kicked after commits. The
claims and every status change are core.deliveries' state machine; this module is the sending loop: each
claimed delivery is sent on a small thread pool with a whole-attempt deadline (counted from the claim,
shorter than the lease) so a slow receiver only holds its own thread.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from celery import shared_task
from sqlalchemy import Connection, Engine, RowMapping, select
from sqlalchemy.exc import InterfaceError, OperationalError

from core.deliveries import claim_due, next_status, record_attempt, skip_disabled
from core.queue import TASK_DELIVER
from core.records import (
    RESULT_EVENT_IMAGE,
    RESULT_EVENT_TEXT,
    DeliveryStatus,
    EventType,
    JobResult,
    result_payload,
)
from core.schema import results
from core.sender import SendOutcome, post_to_checked_url
from core.settings import Settings
from core.ssrf import WebhookURLRefused, resolve_webhook_url
from core.storage import Storage
from core.webhooks import sign_headers, signing_secrets
from worker.runtime import NexusGenTask

log = logging.getLogger(__name__)

MAX_PARALLEL = 8  # attempts in flight per task (core.deliveries caps those per endpoint and per tenant)
POLL_S = 0.5  # while attempts run, look for newly due deliveries this often
TASK_BUDGET_S = 60.0  # one task claims new deliveries for at most this long


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


def _record(
    engine: Engine,
    settings: Settings,
    delivery: RowMapping,
    outcome: SendOutcome,
    status: DeliveryStatus,
    next_in_s: float | None = None,
) -> None:
    """record_attempt in its own transaction, retried through a database outage while the claim lock
    lasts: an answer the receiver gave is not thrown away lightly (unrecorded, the event is sent again
    once the lock runs out)."""
    give_up = time.monotonic() + settings.webhook_lock_s - settings.webhook_timeout_s - 5
    delay = 0.5
    while True:
        try:
            with engine.begin() as conn:
                record_attempt(conn, delivery, outcome, status, next_in_s)
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

    The attempt, name lookup included, ends by `deadline` (time.monotonic(); default WEBHOOK_TIMEOUT_S
    from now), well inside the claim lock (Settings.webhook_lock_s), so no other worker can claim it
    while it is in flight.
    """
    if deadline is None:
        deadline = time.monotonic() + settings.webhook_timeout_s
    if delivery["disabled_at"] is not None:
        with engine.begin() as conn:
            skip_disabled(conn, delivery["id"])
        return DeliveryStatus.DISABLED
    with engine.connect() as conn:
        body = build_body(conn, settings, delivery, storage)
        secrets = signing_secrets(conn, delivery["tenant_id"])
    try:
        checked = resolve_webhook_url(
            delivery["url"], settings.webhook_allow_private_networks, deadline=deadline
        )
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
    status, delay = next_status(outcome, delivery["attempts"], settings.webhook_retry_schedule_s)
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
    in_flight: set[Future[DeliveryStatus]] = set()
    with ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="webhook") as pool:
        while True:
            free = max_parallel - len(in_flight)
            if free > 0 and (deadline is None or time.monotonic() < deadline):
                with engine.begin() as conn:
                    claimed = claim_due(conn, limit=free, lock_s=lock_s, exclude=tried)
                claimed_at = time.monotonic()
                for delivery in claimed:
                    tried.add(delivery["id"])
                    attempt_deadline = claimed_at + settings.webhook_timeout_s
                    in_flight.add(
                        pool.submit(deliver_one, engine, settings, delivery, storage, attempt_deadline)
                    )
            if not in_flight:
                return counts
            done, _ = wait(in_flight, timeout=POLL_S, return_when=FIRST_COMPLETED)
            for future in done:
                in_flight.discard(future)
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
