"""Retention against the real S3 server: with a short TTL the sweeper deletes result and input objects,
the job keeps its record and provenance and says expired, and its result answers 410."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine, update

from core.jobs import claim_batch, complete_job
from core.queue import make_publisher
from core.schema import tenants
from core.settings import Settings
from core.storage import Storage, result_key
from tests.support.api import Tenant, new_tenant, png_bytes
from tests.support.api import upload as upload_image
from worker.sweeper import sweep


def _tenant(engine: Engine, name: str, ttl_s: int | None) -> Tenant:
    tenant = new_tenant(engine, name)
    with engine.begin() as conn:
        conn.execute(update(tenants).where(tenants.c.id == tenant.id).values(result_ttl_s=ttl_s))
    return tenant


def _finish_all(engine: Engine, storage: Storage, settings: Settings, task: str) -> list[str]:
    """Claim the queued jobs of `task` and complete them with a stored PNG, as the worker does."""
    with engine.begin() as conn:
        rows = claim_batch(conn, worker_id="test", tasks=[task], max_batch=8, lease_s=60)
    for row in rows:
        data = png_bytes(32, 32, color="blue")
        key = result_key(row.tenant_id, row.id, "png")
        digest = storage.put_bytes(key, data, "image/png")
        result = {"kind": "image", "object_key": key, "content_type": "image/png", "size_bytes": len(data)}
        with engine.begin() as conn:
            assert complete_job(
                conn,
                row.id,
                row.attempt,
                provenance={"seed": 7, "batch_size": len(rows)},
                result={**result, "sha256": digest, "width": 32, "height": 32},
                result_ttl_s=settings.result_ttl_s,
            )
    return [r.id for r in rows]


def test_short_ttl_deletes_objects_and_the_result_answers_410(
    engine: Engine, clean_db: Any, storage: Storage, settings: Settings
) -> None:
    from api.app import create_app

    cfg = settings.with_overrides(result_ttl_s=3600)
    client = create_app(cfg).test_client()
    publisher = make_publisher(cfg)
    short = _tenant(engine, "short", ttl_s=1)  # the per-tenant override
    kept = _tenant(engine, "kept", ttl_s=None)  # the default: an hour
    auth = short.headers
    upload = upload_image(client, short).get_json()["id"]
    job = client.post(
        "/v1/jobs", json={"task": "edit", "instruction": "blue", "image": upload}, headers=auth
    ).get_json()
    other = client.post(
        "/v1/jobs", json={"task": "edit", "instruction": "red", "image": upload}, headers=auth
    ).get_json()
    kept_job = client.post(
        "/v1/jobs",
        json={"task": "generate", "prompt": "a fox"},
        headers=kept.headers,
    ).get_json()
    time.sleep(1.5)

    # The input is past its retention, but queued jobs use it: it stays.
    counts = sweep(engine, publisher, cfg, storage)
    assert counts["uploads_expired"] == 0
    assert len(storage.list_keys(f"tenants/{short.id}/uploads/")) == 1
    assert client.post(f"/v1/jobs/{other['id']}/cancel", headers=auth).status_code == 200

    finished = _finish_all(engine, storage, cfg, "edit") + _finish_all(engine, storage, cfg, "generate")
    assert sorted(finished) == sorted([job["id"], kept_job["id"]])
    live = client.get(f"/v1/jobs/{job['id']}", headers=auth).get_json()
    assert live["result"]["expired"] is False and live["result"]["url"]
    assert len(storage.list_keys(f"tenants/{short.id}/")) == 2  # the input and the result
    time.sleep(1.5)

    counts = sweep(engine, publisher, cfg, storage)
    assert (counts["results_expired"], counts["uploads_expired"], counts["objects_deleted"]) == (1, 1, 2)
    assert storage.list_keys(f"tenants/{short.id}/") == []
    body = client.get(f"/v1/jobs/{job['id']}", headers=auth).get_json()
    assert body["status"] == "succeeded" and body["provenance"]["seed"] == 7
    assert body["result"]["expired"] is True and body["result"]["expired_at"] and "url" not in body["result"]
    gone = client.get(f"/v1/jobs/{job['id']}/result", headers=auth)
    assert gone.status_code == 410 and gone.get_json()["error"]["code"] == "result_expired"
    again = client.post("/v1/jobs", json={"task": "edit", "instruction": "x", "image": upload}, headers=auth)
    assert again.status_code == 422 and again.get_json()["error"]["code"] == "upload_expired"

    # The other tenant keeps the default retention: its result is still there.
    assert len(storage.list_keys(f"tenants/{kept.id}/jobs/")) == 1
    r = client.get(f"/v1/jobs/{kept_job['id']}/result", headers=kept.headers)
    assert r.status_code == 302
    assert sweep(engine, publisher, cfg, storage)["objects_deleted"] == 0
