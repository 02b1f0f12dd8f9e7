"""The one-statement peek (core.jobs.peek_head) picks the same head as the three statements of before the
rollups (bench.queue_before, which bench_queue times beside it), claim after claim."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine

from bench import queue_before
from core import jobs as sm
from core.ids import new_id
from core.ingest import insert_jobs
from core.schema import tenants
from core.submit import JobDraft


def _queue(conn: Any, tenant_id: str, n: int, steps: int, priority: int) -> None:
    params = {"width": 256, "height": 256, "steps": steps, "cfg_scale": 3.0, "guidance": 3.5}
    draft = JobDraft(
        task="generate",
        prompt="x",
        params=params,
        bucket=sm.bucket_key("generate", params),
        priority=priority,
    )
    insert_jobs(conn, tenant_id, None, [draft] * n)


def _key(head: Any) -> Any:
    return None if head is None else (head.bucket, head.priority, head.tenant_id, head.queued, head.available)


def test_the_peek_picks_the_head_it_picked_before(clean_db: Engine) -> None:
    with clean_db.begin() as conn:
        for t in range(5):
            tenant_id = new_id("ten")
            conn.execute(tenants.insert().values(id=tenant_id, name=f"t{t}", webhook_secret="whsec_x"))
            for i in range(6):  # uneven groups over 3 buckets and 2 priorities
                _queue(conn, tenant_id, 1 + (t * 7 + i * 3) % 6, steps=2 + i % 3, priority=i % 2)
    compared = 0
    while True:
        with clean_db.connect() as conn:
            for full_at, window_s in ((None, 0.0), (8, 3600.0), (4, 3600.0), (8, 0.0)):
                now = sm.peek_head(conn, ["generate"], full_at=full_at, window_s=window_s)
                before = queue_before.peek(conn, ["generate"], full_at=full_at, window_s=window_s)
                assert _key(now) == _key(before), (full_at, window_s)
                compared += 1
            for bucket in ("generate|generation|256x256|3|3|3.5", "generate|generation|256x256|4|3|3.5"):
                now = sm.peek_head(conn, ["generate"], bucket)
                assert _key(now) == _key(queue_before.peek(conn, ["generate"], bucket)), bucket
        with clean_db.begin() as conn:
            if not sm.claim_batch(conn, worker_id="w", tasks=["generate"], max_batch=5, lease_s=60):
                break
    assert compared > 40  # every claim of the whole queue was compared
