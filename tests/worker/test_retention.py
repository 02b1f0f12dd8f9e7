"""Retention against the real S3 server: with a short TTL the sweeper deletes result and input objects,
the job keeps its record and provenance and says expired, and its result answers 410."""

from __future__ import annotations

import os
import time
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, update

from core import retention
from core.ids import new_id
from core.images import ImageInfo
from core.jobs import claim_batch, complete_job
from core.pending_uploads import insert_pending_uploads, put_pending_uploads
from core.queue import make_publisher
from core.schema import tenants
from core.settings import Settings
from core.storage import Storage, result_key
from core.submit import PendingUpload
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


class CountingStorage(Storage):
    """The real bucket; counts the listing requests the orphan walk makes."""

    requests = 0

    def list_page(
        self, prefix: str, start_after: str, limit: int = 1000
    ) -> list[tuple[str, datetime | None]]:
        self.requests += 1
        return super().list_page(prefix, start_after, limit)


def _stored_input(storage: Storage, tenant_id: str) -> PendingUpload:
    """An inline image put as POST /v1/jobs puts it, before its transaction opens."""
    data = png_bytes(16, 16)
    pending = PendingUpload(id=new_id("upl"), data=data, info=ImageInfo("image/png", 16, 16))
    assert put_pending_uploads(storage, tenant_id, [pending]) == 1
    return pending


def test_the_orphan_walk_deletes_old_inputs_no_row_names_and_keeps_the_rest(
    engine: Engine, clean_db: Any, storage: Storage
) -> None:
    """In a bucket of its own: an input stored by a process that died before its commit (no row) and older
    than the grace goes; a young one, one with a row and results stay. The walk lists a bounded number of
    pages per call and jumps over a tenant's results instead of listing them."""
    bucket = CountingStorage(client=storage.client, bucket=f"orphans-{os.urandom(4).hex()}")
    bucket.ensure_bucket()
    first, second = _tenant(engine, "first", None).id, _tenant(engine, "second", None).id
    results = [result_key(first, f"job_{i:02d}", "png") for i in range(12)]
    for key in results:
        bucket.put_bytes(key, b"result", "image/png")
    orphan = _stored_input(bucket, first)
    named = _stored_input(bucket, first)
    with engine.begin() as conn:
        insert_pending_uploads(conn, first, [named], ttl_s=3600)
    other_orphan = _stored_input(bucket, second)
    # The grace ends between the old inputs and the young one, 1 s from each (S3 may keep whole seconds).
    grace_ends = time.time() + 1.0
    time.sleep(3.0)
    young = _stored_input(bucket, first)

    walk = retention.OrphanWalk()
    deleted, calls = 0, 0
    while True:
        before = bucket.requests
        grace_s = time.time() - grace_ends
        deleted += retention.collect_orphans(engine, bucket, grace_s, walk=walk, pages=1, page_size=2)
        calls += 1
        assert bucket.requests - before == 1  # a call's work is bounded by `pages`, not by the bucket
        if walk.start_after == "" or calls > 20:
            break
    assert deleted == 2
    assert sorted(bucket.list_keys("tenants/")) == sorted([*results, named.object_key, young.object_key])
    assert orphan.object_key not in bucket.list_keys("tenants/")
    assert other_orphan.object_key not in bucket.list_keys("tenants/")
    # first's 2 results, a jump past the other 10, first's 3 inputs and second's 1 in two pages, the end
    assert calls == 4

    # The next pass finds nothing more; once the young one is past the grace, it goes.
    grace_s = time.time() - grace_ends
    assert retention.collect_orphans(engine, bucket, grace_s, walk=walk, pages=10, page_size=2) == 0
    assert walk.start_after == ""
    time.sleep(1.1)
    assert retention.collect_orphans(engine, bucket, grace_s=1.0, walk=walk, pages=10, page_size=2) == 1
    assert sorted(bucket.list_keys("tenants/")) == sorted([*results, named.object_key])


def test_the_sweeper_collects_orphaned_inputs(
    engine: Engine, clean_db: Any, storage: Storage, settings: Settings
) -> None:
    """Through the sweep, with NEXUSGEN_ORPHAN_GRACE_S: the orphan goes within a pass over the bucket."""
    cfg = settings.with_overrides(orphan_grace_s=1.0)
    publisher = make_publisher(cfg)
    tenant = _tenant(engine, "sweeper", None).id
    orphan, named = _stored_input(storage, tenant), _stored_input(storage, tenant)
    with engine.begin() as conn:
        insert_pending_uploads(conn, tenant, [named], ttl_s=3600)
    time.sleep(1.5)
    retention.WALK.start_after = ""
    counts = sweep(engine, publisher, cfg, storage)
    while retention.WALK.start_after and orphan.object_key in storage.list_keys(f"tenants/{tenant}/"):
        counts = sweep(engine, publisher, cfg, storage)
    assert counts["orphans_deleted"] >= 1
    assert storage.list_keys(f"tenants/{tenant}/") == [named.object_key]
