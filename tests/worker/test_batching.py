"""Claiming, the gathering window, the sweeper and stale attempts, against real Postgres, Redis and S3."""

from __future__ import annotations

import threading
import time
from typing import Any

import redis
from sqlalchemy import Engine, update

from core.db import transaction
from core.jobs import cancel_job, claim_batch, expire_leases
from core.queue import MODEL_QUEUES, claimable_batches, make_publisher, top_up
from core.schema import jobs
from core.settings import Settings
from core.storage import Storage
from tests.worker.support import insert_job, job_rows, make_tenant
from worker.batching import gather_and_claim
from worker.sweeper import sweep


def claim(engine: Engine, max_batch: int, lease_s: float = 60, worker: str = "w") -> list[str]:
    with transaction(engine) as conn:
        rows = claim_batch(conn, worker_id=worker, tasks=["generate"], max_batch=max_batch, lease_s=lease_s)
    return [r.id for r in rows]


def test_claim_takes_priority_then_age_across_tenants(engine: Engine, tenant: str) -> None:
    other = make_tenant(engine)
    ids = [
        insert_job(engine, owner, "generate", priority=priority)[0]
        for owner, priority in [(tenant, 0), (other, 5), (tenant, 0), (other, 10), (tenant, 5)]
    ]
    lone, _ = insert_job(engine, tenant, "generate", priority=100, steps=3)  # another bucket
    assert claim(engine, max_batch=3) == [lone]  # the bucket of the most urgent job goes first
    assert claim(engine, max_batch=3) == [ids[3], ids[1], ids[4]]  # one bucket, both tenants
    assert claim(engine, max_batch=3) == [ids[0], ids[2]]
    assert claim(engine, max_batch=3) == []
    rows = job_rows(engine, ids)
    assert {rows[i]["status"] for i in ids} == {"running"}
    assert {rows[i]["attempt"] for i in ids} == {1}


def test_gathering_window_waits_for_batch_mates(engine: Engine, tenant: str, settings: Settings) -> None:
    windowed = settings.with_overrides(max_batch=4, batch_window_s=1.5, lease_s=60)
    first, bucket = insert_job(engine, tenant, "generate")
    claimed: list[Any] = []
    started = time.monotonic()
    thread = threading.Thread(
        target=lambda: claimed.extend(gather_and_claim(engine, windowed, "w", "generate", bucket))
    )
    thread.start()
    time.sleep(0.4)
    mates = [insert_job(engine, tenant, "generate")[0] for _ in range(2)]
    thread.join(timeout=10)
    assert [r.id for r in claimed] == [first, *mates]
    assert time.monotonic() - started >= 1.0  # it waited for the window, not just the first job

    full = [insert_job(engine, tenant, "generate")[0] for _ in range(4)]
    started = time.monotonic()
    assert [r.id for r in gather_and_claim(engine, windowed, "w", "generate", None)] == full
    assert time.monotonic() - started < 1.0  # a full bucket is claimed at once


def test_top_up_keeps_one_ticket_per_claimable_batch(
    engine: Engine, tenant: str, settings: Settings, broker: redis.Redis
) -> None:
    gen, und = MODEL_QUEUES["generate"], MODEL_QUEUES["understand"]
    broker.delete(gen, und)
    publisher = make_publisher(settings)
    for steps in (2, 2, 2, 2, 2, 3):  # buckets of 5 and 1 jobs: 3 + 1 batches of at most 2
        insert_job(engine, tenant, "generate", steps=steps)
    insert_job(engine, tenant, "understand")
    canceled, _ = insert_job(engine, tenant, "understand")
    with transaction(engine) as conn:
        cancel_job(conn, tenant, canceled)
    assert top_up(engine, publisher, 2, ["generate", "understand"]) == 5
    assert (broker.llen(gen), broker.llen(und)) == (4, 1)
    assert top_up(engine, publisher, 2, ["generate", "understand"]) == 0  # no duplicates
    broker.rpop(gen)  # a lost ticket
    assert top_up(engine, publisher, 2, ["generate"]) == 1
    assert broker.llen(gen) == 4
    assert len(claim(engine, max_batch=2)) == 2  # a batch claimed without its ticket leaves a spare
    assert top_up(engine, publisher, 2, ["generate"]) == 0
    with engine.connect() as conn:
        assert claimable_batches(conn, "generate", 2) == 3
    broker.delete(gen, und)
    assert top_up(engine, publisher, 1, ["generate"], max_tickets=4) == 4  # 5 batches of 1; 4 at most
    assert top_up(engine, publisher, 1, ["generate"], max_tickets=4) == 0
    assert broker.llen(gen) == 4
    broker.delete(gen, und)


def test_sweep_requeues_lost_jobs_poisons_repeat_offenders_and_republishes(
    engine: Engine, tenant: str, settings: Settings, broker: redis.Redis
) -> None:
    cfg = settings.with_overrides(max_attempts=2, requeue_after_s=0)
    queue = MODEL_QUEUES["generate"]
    broker.delete(queue)
    lost, _ = insert_job(engine, tenant, "generate")
    poison, _ = insert_job(engine, tenant, "generate")
    with transaction(engine) as conn:  # the poison job was already lost once
        conn.execute(update(jobs).where(jobs.c.id == poison).values(attempt=1, worker_losses=1))
    assert sorted(claim(engine, max_batch=2, lease_s=0.2)) == sorted([lost, poison])
    time.sleep(0.4)
    counts = sweep(engine, make_publisher(cfg), cfg)
    assert counts == {
        "requeued": 1,
        "poisoned": 1,
        "tickets": 1,
        "idempotency_keys_purged": 0,
        "job_events_purged": 0,
    }
    rows = job_rows(engine, [lost, poison])
    assert rows[lost]["status"] == "queued" and rows[lost]["lease_owner"] is None
    assert (rows[poison]["status"], rows[poison]["error_code"]) == ("failed", "poison_job")
    assert broker.llen(queue) == 1

    assert sweep(engine, make_publisher(cfg), cfg)["tickets"] == 0  # its ticket is still there
    broker.delete(queue)  # the broker loses it
    assert sweep(engine, make_publisher(cfg), cfg)["tickets"] == 1
    assert broker.llen(queue) == 1
    broker.delete(queue)


def test_canceled_job_whose_worker_died_ends_canceled_not_queued(engine: Engine, tenant: str) -> None:
    job, _ = insert_job(engine, tenant, "generate")
    assert claim(engine, max_batch=1, lease_s=0.2) == [job]
    with transaction(engine) as conn:
        assert cancel_job(conn, tenant, job).status == "running"  # type: ignore[union-attr]
    time.sleep(0.4)
    with transaction(engine) as conn:
        requeued, failed = expire_leases(conn, max_attempts=3)
    assert (requeued, failed) == ([], [])
    assert job_rows(engine, [job])[job]["status"] == "canceled"


def test_stale_attempt_writes_nothing(
    engine: Engine, tenant: str, storage: Storage, settings: Settings
) -> None:
    from model.requests import Result
    from worker.execute import Item, Outcome
    from worker.heartbeat import LeaseKeeper
    from worker.results import store_outcome

    job, _ = insert_job(engine, tenant, "understand")
    with transaction(engine) as conn:
        (old,) = claim_batch(conn, worker_id="old", tasks=["understand"], max_batch=1, lease_s=0.2)
    time.sleep(0.4)
    with transaction(engine) as conn:
        expire_leases(conn, max_attempts=3)
        (new,) = claim_batch(conn, worker_id="new", tasks=["understand"], max_batch=1, lease_s=60)
    assert new.attempt == old.attempt + 1
    keeper = LeaseKeeper(engine, {job: old.attempt}, lease_s=60, heartbeat_s=60, progress_interval_s=0)
    outcome = Outcome(Item(old), Result(text="late"), batch_size=1)
    assert store_outcome(engine, storage, keeper, outcome, "old") == "lost"
    assert storage.list_keys(f"tenants/{tenant}/jobs/{job}/") == []
    assert job_rows(engine, [job])[job]["status"] == "running"  # still the new attempt's


def test_rejected_completion_leaves_no_orphan_object(engine: Engine, tenant: str, storage: Storage) -> None:
    from core.jobs import fail_job
    from core.storage import result_key
    from worker.results import drop_stale_object

    job, _ = insert_job(engine, tenant, "generate")
    with transaction(engine) as conn:  # another attempt ended the job without a result
        fail_job(conn, job, None, code="poison_job", message="lost too often")
    key = result_key(tenant, job, "png")
    storage.put_bytes(key, b"late bytes", "image/png")  # a stale attempt's upload landed after that
    drop_stale_object(engine, storage, job, key)
    assert storage.list_keys(f"tenants/{tenant}/jobs/{job}/") == []

    running, _ = insert_job(engine, tenant, "generate")  # queued again: its next attempt overwrites the key
    key = result_key(tenant, running, "png")
    storage.put_bytes(key, b"late bytes", "image/png")
    drop_stale_object(engine, storage, running, key)
    assert storage.list_keys(f"tenants/{tenant}/jobs/{running}/") == [key]
