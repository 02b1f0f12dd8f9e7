"""Counter tables: delivery counts equal a count of the delivery rows through inserts, status changes,
deletes and folding; a tenant's queued jobs come from its rollup."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, func, select, update

from core.counts import compact_counts, deliveries_by_status, tenant_queued
from core.ids import new_id
from core.ingest import insert_jobs
from core.jobs import bucket_key, claim_batch
from core.schema import delivery_counts, tenants, webhook_deliveries, webhook_endpoints, webhook_events
from core.submit import JobDraft


def _tenant(conn: Any) -> str:
    tenant_id = new_id("ten")
    conn.execute(tenants.insert().values(id=tenant_id, name=tenant_id, webhook_secret="whsec_x"))
    return tenant_id


def _counted(conn: Any) -> dict[str, int]:
    d = webhook_deliveries.c
    return {s: int(n) for s, n in conn.execute(select(d.status, func.count()).group_by(d.status))}


def test_delivery_counts_follow_every_statement(clean_db: Engine) -> None:
    with clean_db.begin() as conn:
        tenant_id = _tenant(conn)
        endpoint = new_id("end")
        conn.execute(
            webhook_endpoints.insert().values(id=endpoint, tenant_id=tenant_id, url="https://x.test/")
        )
        ids = []
        for _ in range(6):
            event = new_id("msg")
            conn.execute(
                webhook_events.insert().values(
                    id=event, tenant_id=tenant_id, type="job.succeeded", payload={}
                )
            )
            ids.append(new_id("dlv"))
            conn.execute(
                webhook_deliveries.insert().values(
                    id=ids[-1], event_id=event, endpoint_id=endpoint, tenant_id=tenant_id
                )
            )
    d = webhook_deliveries.c
    with clean_db.begin() as conn:
        assert deliveries_by_status(conn) == _counted(conn) == {"pending": 6}
        conn.execute(update(webhook_deliveries).where(d.id.in_(ids[:3])).values(status="succeeded"))
        conn.execute(update(webhook_deliveries).where(d.id == ids[3]).values(status="dead"))
        conn.execute(update(webhook_deliveries).where(d.id == ids[4]).values(attempts=2))  # status unchanged
        conn.execute(webhook_deliveries.delete().where(d.id == ids[0]))
    with clean_db.begin() as conn:
        assert deliveries_by_status(conn) == _counted(conn) == {"pending": 2, "succeeded": 2, "dead": 1}
        rows = conn.execute(select(func.count()).select_from(delivery_counts)).scalar_one()
        assert compact_counts(conn) == rows - 3  # one row per status is left
    with clean_db.connect() as conn:
        assert deliveries_by_status(conn) == _counted(conn)


def test_a_tenants_queued_jobs_come_from_its_rollup(clean_db: Engine) -> None:
    params = {"width": 256, "height": 256, "steps": 2, "cfg_scale": 3.0, "guidance": 3.5}
    with clean_db.begin() as conn:
        a, b = _tenant(conn), _tenant(conn)
        for priority in (0, 2):
            draft = JobDraft(
                task="generate",
                prompt="x",
                params=params,
                bucket=bucket_key("generate", params),
                priority=priority,
            )
            insert_jobs(conn, a, None, [draft] * 5)
        insert_jobs(conn, b, None, [draft] * 3)
    with clean_db.begin() as conn:
        assert (tenant_queued(conn, a), tenant_queued(conn, b)) == (10, 3)
        # priority 2 first; a and b never served: the smaller id (a, made first) takes its turn
        claimed = claim_batch(conn, worker_id="w", tasks=["generate"], max_batch=4, lease_s=60)
        assert {(j.tenant_id, j.priority) for j in claimed} == {(a, 2)} and len(claimed) == 4
    with clean_db.connect() as conn:
        assert (tenant_queued(conn, a), tenant_queued(conn, b)) == (6, 3)
