"""The delivery log and redelivery through the HTTP API (create_app), tenant-scoped."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from core.schema import webhook_deliveries
from tests.support.api import new_tenant
from tests.support.webhooks import start_job, succeed_job
from worker.delivery import deliver_due

pytestmark = pytest.mark.usefixtures("outside_connections")  # tests never leave the machine


@pytest.fixture
def api(settings: Any, engine: Any, clean_db: Any) -> Any:
    from api.app import create_app

    app = create_app(settings.with_overrides(webhook_allow_private_networks=True))
    app.config["TESTING"] = True
    return app.test_client()


def _tenant_with_key(engine: Any, name: str) -> tuple[str, str, dict[str, str]]:
    tenant = new_tenant(engine, name)
    return tenant.id, tenant.secret, tenant.headers


def test_dead_delivery_listed_and_redelivered_with_the_same_webhook_id(
    api: Any, engine: Any, settings: Any, make_receiver: Any
) -> None:
    fast = settings.with_overrides(
        webhook_allow_private_networks=True, webhook_timeout_s=1.0, webhook_retry_schedule_s=()
    )
    tenant_id, _, headers = _tenant_with_key(engine, "acme")
    _, _, other = _tenant_with_key(engine, "globex")
    receiver = make_receiver(statuses=[500, 200])
    job_id, attempt = start_job(engine, tenant_id, webhook_url=receiver.url + "/hook")
    succeed_job(engine, job_id, attempt, tenant_id)
    assert deliver_due(engine, fast) == {"dead": 1}  # no retries in this schedule: dead at once

    listed = api.get(f"/v1/webhook-deliveries?job_id={job_id}&status=dead", headers=headers)
    assert listed.status_code == 200, listed.get_json()
    (delivery,) = listed.get_json()["data"]
    assert delivery["status"] == "dead" and delivery["event_type"] == "job.succeeded"
    assert delivery["job_id"] == job_id and delivery["url"] == receiver.url + "/hook"
    assert [(a["attempt"], a["status_code"], a["error"]) for a in delivery["attempt_log"]] == [
        (1, 500, "HTTP 500")
    ]
    assert api.get("/v1/webhook-deliveries?status=succeeded", headers=headers).get_json()["data"] == []
    assert api.get(f"/v1/webhook-deliveries?job_id={job_id}", headers=other).get_json()["data"] == []
    bad = api.get("/v1/webhook-deliveries?status=lost", headers=headers)
    assert bad.status_code == 422 and bad.get_json()["error"]["code"] == "validation_error"
    assert api.get("/v1/webhook-deliveries").status_code == 401

    url = f"/v1/webhook-deliveries/{delivery['id']}/redeliver"
    assert (
        api.post(url, headers=other).status_code == 404
    )  # another tenant's delivery does not exist for them
    assert api.post("/v1/webhook-deliveries/whd_nope/redeliver", headers=headers).status_code == 404
    replay = api.post(url, headers=headers)
    assert replay.status_code == 200, replay.get_json()
    assert replay.get_json()["status"] == "pending" and replay.get_json()["event_id"] == delivery["event_id"]

    assert deliver_due(engine, fast) == {"succeeded": 1}
    assert [r.headers["webhook-id"] for r in receiver.received] == [delivery["event_id"]] * 2
    after = api.get(f"/v1/webhook-deliveries?job_id={job_id}", headers=headers).get_json()["data"][0]
    assert after["status"] == "succeeded" and [a["status_code"] for a in after["attempt_log"]] == [500, 200]


def test_paging_and_in_flight_conflict(api: Any, engine: Any, settings: Any) -> None:
    tenant_id, _, headers = _tenant_with_key(engine, "acme")
    for n in range(3):
        job_id, attempt = start_job(
            engine, tenant_id, webhook_url=f"http://127.0.0.1:9/{n}", custom_id=f"r{n}"
        )
        succeed_job(engine, job_id, attempt, tenant_id)
    first = api.get("/v1/webhook-deliveries?limit=2", headers=headers).get_json()
    assert len(first["data"]) == 2 and first["next_cursor"] == first["data"][-1]["id"]
    second = api.get(
        f"/v1/webhook-deliveries?limit=2&cursor={first['next_cursor']}", headers=headers
    ).get_json()
    assert len(second["data"]) == 1 and second["next_cursor"] is None
    ids = [d["id"] for d in first["data"] + second["data"]]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 3

    with engine.begin() as conn:  # an attempt holds the lease: redelivery must wait
        in_flight = datetime.now(UTC) + timedelta(hours=1)
        conn.execute(
            update(webhook_deliveries).where(webhook_deliveries.c.id == ids[0]).values(locked_until=in_flight)
        )
    busy = api.post(f"/v1/webhook-deliveries/{ids[0]}/redeliver", headers=headers)
    assert busy.status_code == 409 and busy.get_json()["error"]["code"] == "conflict"


def test_redeliver_with_an_idempotency_key_resets_only_once(
    api: Any, engine: Any, settings: Any, make_receiver: Any
) -> None:
    fast = settings.with_overrides(webhook_allow_private_networks=True, webhook_timeout_s=1.0)
    tenant_id, _, headers = _tenant_with_key(engine, "acme")
    receiver = make_receiver()
    job_id, attempt = start_job(engine, tenant_id, webhook_url=receiver.url + "/hook")
    succeed_job(engine, job_id, attempt, tenant_id)
    assert deliver_due(engine, fast) == {"succeeded": 1}
    (delivery,) = api.get("/v1/webhook-deliveries", headers=headers).get_json()["data"]

    keyed = {**headers, "Idempotency-Key": "replay-1"}
    url = f"/v1/webhook-deliveries/{delivery['id']}/redeliver"
    first = api.post(url, headers=keyed)
    assert first.status_code == 200 and first.get_json()["status"] == "pending"
    assert deliver_due(engine, fast) == {"succeeded": 1}
    again = api.post(url, headers=keyed)  # a retried request: the first answer, nothing reset
    assert again.headers.get("Idempotent-Replayed") == "true" and again.get_json() == first.get_json()
    assert deliver_due(engine, fast) == {}
    assert len(receiver.received) == 2
    assert {r.headers["webhook-id"] for r in receiver.received} == {delivery["event_id"]}
