"""A JSONL batch posted with `?webhook_url=` gets every job.* event and one batch.completed, signed.

Real parts: the API app, a real Celery model worker on the tiny checkpoint, the outbox delivery code and a
loopback receiver; signatures are checked with the standardwebhooks package.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, select
from standardwebhooks import Webhook

from core.schema import uploads
from core.settings import Settings
from core.storage import Storage
from nexusgen.receiver import WebhookReceiver
from tests.support.api import new_tenant
from tests.support.api import upload as upload_image
from tests.worker.support import WorkerProcess, wait_for
from worker.delivery import deliver_due


@pytest.fixture(scope="module")
def cfg(settings: Settings) -> Settings:
    return settings.with_overrides(max_batch=4, batch_window_s=0.3, lease_s=30, heartbeat_s=0.5)


@pytest.fixture(scope="module")
def worker(cfg: Settings, start_worker: Callable[..., WorkerProcess]) -> WorkerProcess:
    return start_worker(cfg, "batch-webhooks", preload=True)


@pytest.fixture
def receiver(make_receiver: Callable[..., WebhookReceiver]) -> WebhookReceiver:
    return make_receiver()


def test_jsonl_batch_webhook_gets_every_job_event_and_one_batch_completed(
    engine: Engine,
    clean_db: Any,
    storage: Storage,
    cfg: Settings,
    worker: WorkerProcess,
    receiver: WebhookReceiver,
) -> None:
    from api.app import create_app

    tenant = new_tenant(engine, "hooks")
    client = create_app(cfg).test_client()
    auth = tenant.headers
    upload = upload_image(client, tenant).get_json()["id"]
    with engine.connect() as conn:
        upload_key = conn.execute(select(uploads.c.object_key).where(uploads.c.id == upload)).scalar_one()
    storage.delete(upload_key)  # the edit job's input is gone: it fails in the worker (job.failed)
    params = {"width": 256, "height": 256, "steps": 2}
    lines = [
        {"custom_id": "g1", "task": "generate", "prompt": "a fox", "params": params},
        {"custom_id": "g2", "task": "generate", "prompt": "a cat", "params": params},
        {"custom_id": "e1", "task": "edit", "instruction": "blue", "image": upload, "params": params},
    ]
    r = client.post(
        "/v1/batches",
        data="\n".join(json.dumps(line) for line in lines),
        headers={**auth, "Content-Type": "application/x-ndjson"},
        query_string={"webhook_url": receiver.url + "/hook", "metadata": json.dumps({"order": 7})},
    )
    assert r.status_code == 201, r.get_json()
    batch_id = r.get_json()["id"]
    job_ids = [j["id"] for j in client.get(f"/v1/jobs?batch_id={batch_id}", headers=auth).get_json()["data"]]
    rows = wait_for(engine, job_ids, timeout_s=180)
    assert sorted(r["status"] for r in rows.values()) == ["failed", "succeeded", "succeeded"], worker.tail()

    deadline = time.monotonic() + 60
    while len(receiver.received) < 4 and time.monotonic() < deadline:
        deliver_due(engine, cfg, storage=storage)
        time.sleep(0.2)
    time.sleep(0.5)
    deliver_due(engine, cfg, storage=storage)  # nothing more may come
    payloads = [Webhook(tenant.secret).verify(req.body, req.headers) for req in receiver.received]
    assert {req.path for req in receiver.received} == {"/hook"}
    assert len({req.headers["webhook-id"] for req in receiver.received}) == len(receiver.received)

    job_events = {p["data"]["custom_id"]: p["type"] for p in payloads if p["type"].startswith("job.")}
    assert job_events == {"g1": "job.succeeded", "g2": "job.succeeded", "e1": "job.failed"}
    assert all(p["data"]["batch_id"] == batch_id for p in payloads if p["type"].startswith("job."))
    completed = [p for p in payloads if p["type"] == "batch.completed"]
    assert len(completed) == 1 and len(payloads) == 4
    assert completed[0]["data"]["id"] == batch_id and completed[0]["data"]["metadata"] == {"order": 7}
    assert completed[0]["data"]["counts"] == {"succeeded": 2, "failed": 1, "canceled": 0}
