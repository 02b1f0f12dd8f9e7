"""The job state machine against a real PostgreSQL: exclusive claims, attempts, batch completion, cancel."""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import Engine, func, select, text

from core import jobs as sm
from core.ids import new_id
from core.records import JobStatus
from core.schema import batches, jobs, tenants, webhook_deliveries, webhook_events

PARAMS = {"width": 256, "height": 256, "steps": 2, "cfg_scale": 3.0, "guidance": 3.5, "seed": 1}


def _tenant(conn: Any) -> str:
    tenant_id = new_id("ten")
    conn.execute(tenants.insert().values(id=tenant_id, name=tenant_id, webhook_secret="whsec_x"))
    return tenant_id


def _jobs(
    conn: Any,
    tenant_id: str,
    n: int,
    *,
    batch_id: str | None = None,
    priority: int = 0,
    params: dict | None = None,
    webhook: str | None = None,
) -> list[str]:
    p = params or PARAMS
    ids = [new_id("job") for _ in range(n)]
    conn.execute(
        jobs.insert(),
        [
            dict(
                id=i,
                tenant_id=tenant_id,
                batch_id=batch_id,
                task="generate",
                prompt="a cat",
                params=p,
                bucket=sm.bucket_key("generate", p),
                priority=priority,
                webhook_url=webhook,
            )
            for i in ids
        ],
    )
    return ids


def _status(engine: Engine, job_id: str) -> str:
    with engine.connect() as conn:
        return conn.execute(select(jobs.c.status).where(jobs.c.id == job_id)).scalar_one()


def test_claim_is_exclusive_under_concurrency(clean_db: Engine) -> None:
    with clean_db.begin() as conn:
        _jobs(conn, _tenant(conn), 40)
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while True:
            with clean_db.begin() as conn:
                rows = sm.claim_batch(conn, worker_id=name, tasks=["generate"], max_batch=3, lease_s=60)
            if not rows:
                return
            with lock:
                claimed.extend(r.id for r in rows)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 40 and len(set(claimed)) == 40


def test_claim_groups_one_bucket_by_priority_then_age(clean_db: Engine) -> None:
    other = dict(PARAMS, width=512)
    with clean_db.begin() as conn:
        tenant_id = _tenant(conn)
        low = _jobs(conn, tenant_id, 2)
        _jobs(conn, tenant_id, 2, params=other)
        high = _jobs(conn, tenant_id, 2, priority=5)
    with clean_db.begin() as conn:
        rows = sm.claim_batch(conn, worker_id="w", tasks=["generate"], max_batch=8, lease_s=60)
    assert [r.id for r in rows] == high + low
    assert {r.bucket for r in rows} == {sm.bucket_key("generate", PARAMS)}
    assert all(r.attempt == 1 and r.status is JobStatus.RUNNING for r in rows)


def test_stale_attempt_cannot_write_after_lease_expiry(clean_db: Engine) -> None:
    with clean_db.begin() as conn:
        (job_id,) = _jobs(conn, _tenant(conn), 1)
    with clean_db.begin() as conn:
        (row,) = sm.claim_batch(conn, worker_id="old", tasks=["generate"], max_batch=1, lease_s=-1)
    with clean_db.begin() as conn:
        requeued, failed = sm.expire_leases(conn, max_attempts=3)
    assert [r.id for r in requeued] == [job_id] and failed == []
    with clean_db.begin() as conn:
        (new,) = sm.claim_batch(conn, worker_id="new", tasks=["generate"], max_batch=1, lease_s=60)
    assert new.attempt == 2
    result = {"kind": "text", "text": "x"}
    with clean_db.begin() as conn:
        assert sm.record_progress(conn, job_id, row.attempt, stage="denoising") is sm.Ack.LOST
        assert not sm.complete_job(conn, job_id, row.attempt, provenance={}, result=result)
    with clean_db.begin() as conn:
        assert sm.complete_job(conn, job_id, new.attempt, provenance={"a": 1}, result=result)
        assert not sm.complete_job(conn, job_id, new.attempt, provenance={}, result=result)
    assert _status(clean_db, job_id) == "succeeded"


def test_poison_job_fails_after_max_attempts(clean_db: Engine) -> None:
    with clean_db.begin() as conn:
        (job_id,) = _jobs(conn, _tenant(conn), 1)
    for _ in range(2):
        with clean_db.begin() as conn:
            sm.claim_batch(conn, worker_id="w", tasks=["generate"], max_batch=1, lease_s=-1)
        with clean_db.begin() as conn:
            _requeued, failed = sm.expire_leases(conn, max_attempts=2)
    assert failed and failed[0].error_code == "poison_job"
    assert _status(clean_db, job_id) == "failed"


def test_batch_completed_announced_exactly_once(clean_db: Engine) -> None:
    url = "http://127.0.0.1:9/hook"
    with clean_db.begin() as conn:
        tenant_id = _tenant(conn)
        batch_id = new_id("bat")
        conn.execute(batches.insert().values(id=batch_id, tenant_id=tenant_id, total_jobs=3, webhook_url=url))
        ids = _jobs(conn, tenant_id, 3, batch_id=batch_id, webhook=url)
    with clean_db.begin() as conn:
        rows = sm.claim_batch(conn, worker_id="w", tasks=["generate"], max_batch=3, lease_s=60)
    with clean_db.begin() as conn:
        assert sm.cancel_job(conn, tenant_id, ids[2]).cancel_requested  # type: ignore[union-attr]
    with clean_db.begin() as conn:
        sm.fail_job(conn, ids[1], rows[1].attempt, code="bad", message="m")
        sm.mark_canceled(conn, ids[2], rows[2].attempt)
    with clean_db.connect() as conn:
        assert conn.execute(select(batches.c.completed_at).where(batches.c.id == batch_id)).scalar() is None
    with clean_db.begin() as conn:
        sm.complete_job(conn, ids[0], rows[0].attempt, provenance={}, result={"kind": "text", "text": "t"})
    with clean_db.connect() as conn:
        types = sorted(conn.execute(select(webhook_events.c.type)).scalars())
        deliveries = conn.execute(select(func.count()).select_from(webhook_deliveries)).scalar()
    assert types == ["batch.completed", "job.canceled", "job.failed", "job.succeeded"]
    assert deliveries == 4


def test_cancel_queued_job_never_starts_and_unclaimed_jobs_are_republished(clean_db: Engine) -> None:
    with clean_db.begin() as conn:
        tenant_id = _tenant(conn)
        a, b = _jobs(conn, tenant_id, 2)
    with clean_db.begin() as conn:
        assert sm.cancel_job(conn, tenant_id, a).status is JobStatus.CANCELED  # type: ignore[union-attr]
        assert sm.cancel_job(conn, "ten_other", b) is None  # another tenant's job is invisible
    with clean_db.begin() as conn:
        stale = sm.find_unclaimed(conn, older_than_s=-1)
    assert [r["id"] for r in stale] == [b]
    with clean_db.begin() as conn:
        rows = sm.claim_batch(conn, worker_id="w", tasks=["generate"], max_batch=8, lease_s=60)
    assert [r.id for r in rows] == [b]


def test_sweeper_purges_expired_idempotency_keys(clean_db: Engine) -> None:
    from core.idempotency import purge_expired
    from core.schema import idempotency_keys

    with clean_db.begin() as conn:
        tenant_id = _tenant(conn)
        conn.execute(idempotency_keys.insert().values(tenant_id=tenant_id, key="new", request_hash="h"))
        conn.execute(
            idempotency_keys.insert().values(
                tenant_id=tenant_id,
                key="old",
                request_hash="h",
                created_at=func.now() - text("interval '2 days'"),
            )
        )
    with clean_db.begin() as conn:
        assert purge_expired(conn, 24 * 3600) == 1
        assert conn.execute(select(idempotency_keys.c.key)).scalars().all() == ["new"]


def test_transient_put_backs_do_not_count_toward_poison(clean_db: Engine) -> None:
    with clean_db.begin() as conn:
        (job_id,) = _jobs(conn, _tenant(conn), 1)
    for _ in range(5):  # a storage or database blip puts the job back, again and again
        with clean_db.begin() as conn:
            (row,) = sm.claim_batch(conn, worker_id="w", tasks=["generate"], max_batch=1, lease_s=60)
            assert sm.requeue_job(conn, job_id, row.attempt, reason="transient error: S3Error")
    for losses in (1, 2):  # then the worker is lost: only these count, and max_attempts is 3
        with clean_db.begin() as conn:
            sm.claim_batch(conn, worker_id="w", tasks=["generate"], max_batch=1, lease_s=-1)
        with clean_db.begin() as conn:
            requeued, failed = sm.expire_leases(conn, max_attempts=3)
        assert [j.id for j in requeued] == [job_id] and not failed
        assert (requeued[0].worker_losses, requeued[0].put_backs) == (losses, 5)
    with clean_db.begin() as conn:
        sm.claim_batch(conn, worker_id="w", tasks=["generate"], max_batch=1, lease_s=-1)
    with clean_db.begin() as conn:
        requeued, failed = sm.expire_leases(conn, max_attempts=3)
    assert not requeued and [j.id for j in failed] == [job_id]
    assert (failed[0].worker_losses, failed[0].put_backs, failed[0].attempt) == (3, 5, 8)
    assert failed[0].error_code == "poison_job"
