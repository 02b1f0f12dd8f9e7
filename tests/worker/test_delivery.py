"""Delivery from the outbox to a real loopback receiver: signatures, retries, 410, timeouts, dead letters."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from standardwebhooks import Webhook, WebhookVerificationError

from core.deliveries import redeliver, retry_delay
from core.schema import webhook_attempts, webhook_deliveries, webhook_endpoints, webhook_events
from core.storage import Storage
from core.webhooks import rotate_secret, sign_headers
from nexusgen.embedded import free_port
from tests.support.webhooks import start_job, succeed_job, webhook_event
from worker.delivery import deliver_due

pytestmark = pytest.mark.usefixtures("outside_connections")  # tests never leave the machine


def _deliveries(engine: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(webhook_deliveries).order_by(webhook_deliveries.c.id)).mappings())


def _attempts(engine: Any, delivery_id: str) -> list[Any]:
    with engine.connect() as conn:
        q = (
            select(webhook_attempts)
            .where(webhook_attempts.c.delivery_id == delivery_id)
            .order_by(webhook_attempts.c.id)
        )
        return list(conn.execute(q).mappings())


def _make_due(engine: Any) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(webhook_deliveries)
            .where(webhook_deliveries.c.status == "pending")
            .values(next_attempt_at=datetime.now(UTC) - timedelta(seconds=1))
        )


def test_signed_job_event_verifies_with_standardwebhooks(
    engine: Any, fast_delivery: Any, webhook_tenant: Any, make_receiver: Any
) -> None:
    receiver = make_receiver()
    job_id, attempt = start_job(
        engine, webhook_tenant["id"], webhook_url=receiver.url + "/hooks", metadata={"order": 7}
    )
    succeed_job(engine, job_id, attempt, webhook_tenant["id"])

    assert deliver_due(engine, fast_delivery, storage=Storage.from_settings(fast_delivery)) == {
        "succeeded": 1
    }
    (request,) = receiver.received
    payload = Webhook(webhook_tenant["webhook_secret"]).verify(request.body, request.headers)
    assert payload["type"] == "job.succeeded"
    assert set(payload) == {"type", "timestamp", "data"}
    data = payload["data"]
    assert data["id"] == job_id and data["status"] == "succeeded" and data["custom_id"] == "row-1"
    assert data["metadata"] == {"order": 7}
    assert data["links"]["result"] == f"{fast_delivery.public_base_url}/v1/jobs/{job_id}/result"
    assert data["result"]["kind"] == "image" and "url" in data["result"] and "expires_at" in data["result"]
    assert datetime.fromisoformat(data["result"]["expires_at"]) > datetime.now(UTC)
    assert b"base64" not in request.body and len(request.body) < 4000  # links, never inline images
    with engine.connect() as conn:
        event_id = conn.execute(select(webhook_events.c.id)).scalar_one()
    assert request.headers["webhook-id"] == event_id
    (delivery,) = _deliveries(engine)
    assert (
        delivery["status"] == "succeeded"
        and delivery["attempts"] == 1
        and delivery["delivered_at"] is not None
    )

    with pytest.raises(WebhookVerificationError):
        Webhook(webhook_tenant["webhook_secret"]).verify(
            request.body.replace(b"succeeded", b"failed"), request.headers
        )
    old = datetime.now(UTC) - timedelta(minutes=10)
    old_headers = sign_headers(
        [webhook_tenant["webhook_secret"]], event_id, request.body.decode(), timestamp=old
    )
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(webhook_tenant["webhook_secret"]).verify(request.body, old_headers)


def test_both_secrets_verify_during_rotation_overlap(
    engine: Any, fast_delivery: Any, webhook_tenant: Any, make_receiver: Any
) -> None:
    receiver = make_receiver()
    old_secret = webhook_tenant["webhook_secret"]
    with engine.begin() as conn:
        new_secret = rotate_secret(conn, webhook_tenant["id"], overlap_s=3600)
    assert new_secret.startswith("whsec_") and new_secret != old_secret
    webhook_event(engine, webhook_tenant["id"], receiver.url, 1)
    deliver_due(engine, fast_delivery)
    (request,) = receiver.received
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    assert Webhook(old_secret).verify(request.body, request.headers)["data"]["id"] == "bat_1"
    assert Webhook(new_secret).verify(request.body, request.headers)["data"]["id"] == "bat_1"

    with engine.begin() as conn:  # the overlap ends: only the new secret signs
        newest = rotate_secret(conn, webhook_tenant["id"], overlap_s=0)
    webhook_event(engine, webhook_tenant["id"], receiver.url, 2)
    deliver_due(engine, fast_delivery)
    last = receiver.received[-1]
    assert len(last.headers["webhook-signature"].split(" ")) == 1
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret).verify(last.body, last.headers)  # new_secret is now the expired previous one
    assert Webhook(newest).verify(last.body, last.headers)["data"]["id"] == "bat_2"


def test_receiver_down_then_up_same_webhook_id(
    engine: Any, fast_delivery: Any, webhook_tenant: Any, make_receiver: Any
) -> None:
    port = free_port()
    event_id = webhook_event(engine, webhook_tenant["id"], f"http://127.0.0.1:{port}/in")
    assert deliver_due(engine, fast_delivery) == {"pending": 1}
    (delivery,) = _deliveries(engine)
    assert delivery["attempts"] == 1 and "connect" in delivery["last_error"]
    wait = (delivery["next_attempt_at"] - datetime.now(UTC)).total_seconds()
    assert 30 * 0.8 - 2 < wait <= 30 * 1.2  # the first step of the schedule, with jitter
    assert deliver_due(engine, fast_delivery) == {}  # not due yet

    receiver = make_receiver(port=port, statuses=[503, 200])
    _make_due(engine)
    assert deliver_due(engine, fast_delivery) == {"pending": 1}
    _make_due(engine)
    assert deliver_due(engine, fast_delivery) == {"succeeded": 1}
    assert [r.headers["webhook-id"] for r in receiver.received] == [event_id, event_id]
    for request in receiver.received:
        Webhook(webhook_tenant["webhook_secret"]).verify(request.body, request.headers)
    attempts = _attempts(engine, delivery["id"])
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert attempts[0]["status_code"] is None and "connect" in attempts[0]["error"]
    assert attempts[1]["status_code"] == 503 and attempts[1]["error"] == "HTTP 503"
    assert attempts[2]["status_code"] == 200 and attempts[2]["error"] is None
    assert all(a["latency_ms"] is not None for a in attempts)
    assert attempts[2]["response_excerpt"] == "ok"


def test_410_disables_the_endpoint_and_stops_its_deliveries(
    engine: Any, fast_delivery: Any, webhook_tenant: Any, make_receiver: Any
) -> None:
    receiver = make_receiver(statuses=[410])
    webhook_event(engine, webhook_tenant["id"], receiver.url, 1)
    assert deliver_due(engine, fast_delivery) == {"disabled": 1}
    with engine.connect() as conn:
        endpoint = conn.execute(select(webhook_endpoints)).mappings().one()
    assert endpoint["disabled_at"] is not None and "410" in endpoint["disabled_reason"]
    webhook_event(engine, webhook_tenant["id"], receiver.url, 2)
    assert deliver_due(engine, fast_delivery) == {}
    assert [d["status"] for d in _deliveries(engine)] == ["disabled", "disabled"]
    assert len(receiver.received) == 1


def test_slow_receiver_times_out_without_blocking_others(
    engine: Any, fast_delivery: Any, webhook_tenant: Any, make_receiver: Any
) -> None:
    patient = fast_delivery.with_overrides(webhook_timeout_s=2.0)
    slow = make_receiver(delay_s=6.0)
    quick = make_receiver()
    webhook_event(engine, webhook_tenant["id"], slow.url + "/slow", 1)
    webhook_event(engine, webhook_tenant["id"], quick.url + "/quick", 2)
    t0 = time.monotonic()
    counts = deliver_due(engine, patient)
    elapsed = time.monotonic() - t0
    assert counts == {"pending": 1, "succeeded": 1}
    assert quick.received[0].at - t0 < 1.5  # served while the slow one was still waiting
    assert elapsed < 5.0  # bounded by the 2 s timeout, not by the receiver's 6 s
    slow_delivery = next(d for d in _deliveries(engine) if d["status"] == "pending")
    assert "timed out" in slow_delivery["last_error"]


def test_dead_after_the_last_retry_then_redelivered(
    engine: Any, fast_delivery: Any, webhook_tenant: Any, make_receiver: Any
) -> None:
    receiver = make_receiver(statuses=[500, 500, 500, 200])
    event_id = webhook_event(engine, webhook_tenant["id"], receiver.url)
    statuses = []
    for _ in range(3):  # the first try and the two retries of the schedule
        _make_due(engine)
        statuses.append(next(iter(deliver_due(engine, fast_delivery))))
    assert statuses == ["pending", "pending", "dead"]
    (delivery,) = _deliveries(engine)
    assert delivery["status"] == "dead" and delivery["attempts"] == 3 and delivery["last_status_code"] == 500

    with engine.begin() as conn:
        row = redeliver(conn, webhook_tenant["id"], delivery["id"])
        assert redeliver(conn, "ten_other", delivery["id"]) is None  # another tenant's delivery: not found
    assert row is not None and row["status"] == "pending" and row["attempts"] == 0
    assert deliver_due(engine, fast_delivery) == {"succeeded": 1}
    assert {r.headers["webhook-id"] for r in receiver.received} == {event_id}
    assert len(_attempts(engine, delivery["id"])) == 4


def test_refused_at_delivery_time_is_recorded_without_connecting(
    engine: Any, settings: Any, webhook_tenant: Any, make_receiver: Any, outside_connections: list[Any]
) -> None:
    strict = settings.with_overrides(webhook_allow_private_networks=False)
    listener = make_receiver()
    webhook_event(engine, webhook_tenant["id"], "http://10.0.0.1/hook", 1)
    webhook_event(engine, webhook_tenant["id"], listener.url + "/hook", 2)
    webhook_event(engine, webhook_tenant["id"], "http://169.254.169.254/latest/meta-data/", 3)
    assert deliver_due(engine, strict) == {"refused": 3}
    errors = sorted(d["last_error"].split(":")[0] for d in _deliveries(engine))
    assert errors == ["loopback_address", "metadata_address", "private_address"]
    assert listener.connections == 0 and outside_connections == []


def test_retry_schedule_spans_about_three_days(settings: Any) -> None:
    schedule = type(settings)().webhook_retry_schedule_s
    total = sum(schedule)
    assert 2.5 * 86400 < total < 3.5 * 86400
    delays = [retry_delay(schedule, n) for n in range(1, len(schedule) + 1)]
    assert all(d is not None and 0.8 * s <= d <= 1.2 * s for d, s in zip(delays, schedule, strict=True))
    assert retry_delay(schedule, len(schedule) + 1) is None
    assert json.dumps(delays)  # plain floats


def test_new_events_are_picked_up_while_a_slow_attempt_is_in_flight(
    engine: Any, fast_delivery: Any, webhook_tenant: Any, make_receiver: Any
) -> None:
    patient = fast_delivery.with_overrides(webhook_timeout_s=2.5)
    slow = make_receiver(delay_s=3.0)
    quick = make_receiver()
    webhook_event(engine, webhook_tenant["id"], slow.url + "/slow", 1)
    counts: dict[str, int] = {}
    runner = threading.Thread(target=lambda: counts.update(deliver_due(engine, patient, budget_s=6.0)))
    runner.start()  # as the Celery task runs it: claiming goes on while attempts are in flight
    while not slow.received:
        time.sleep(0.02)
    enqueued_at = time.monotonic()
    webhook_event(engine, webhook_tenant["id"], quick.url + "/quick", 2)
    runner.join(timeout=15)
    assert not runner.is_alive()
    assert quick.received and quick.received[0].at - enqueued_at < 1.8  # before the slow one timed out
    assert counts == {"pending": 1, "succeeded": 1}
