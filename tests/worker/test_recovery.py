"""Lost, duplicated and orphaned work: every job still ends exactly once, with exactly one result object.

Real worker processes, a real Redis broker (FLUSHALL loses messages), kill -9 in the middle of a batch,
and the sweeper called as the beat would call it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import redis
from sqlalchemy import Engine, func, select

from core.queue import MAINTENANCE_QUEUE, MODEL_QUEUES, TASK_SWEEP, make_publisher
from core.schema import jobs
from core.settings import Settings
from core.storage import Storage
from tests.worker.support import (
    WorkerProcess,
    insert_job,
    job_rows,
    make_upload,
    publish,
    result_rows,
    send_tickets,
    wait_for,
    warm,
)
from worker.sweeper import sweep


@pytest.fixture(scope="module")
def cfg(settings: Settings) -> Settings:
    # Short leases so a killed worker's jobs come back within seconds.
    return settings.with_overrides(
        max_batch=4,
        batch_window_s=0.2,
        lease_s=3,
        heartbeat_s=0.5,
        progress_interval_s=0.1,
        requeue_after_s=0,
    )


@pytest.fixture(scope="module")
def survivor(cfg: Settings, start_worker: Callable[..., WorkerProcess]) -> Callable[[], WorkerProcess]:
    """The module's long-lived worker, started on first use (so a test can lose messages before it runs)."""
    started: list[WorkerProcess] = []

    def get() -> WorkerProcess:
        if not started:
            queues = [*MODEL_QUEUES.values(), MAINTENANCE_QUEUE]  # it also runs the sweeper task
            started.append(start_worker(cfg, "survivor", queues=queues))
        return started[0]

    return get


def assert_done_once(engine: Engine, storage: Storage, tenant: str, ids: Iterable[str]) -> dict[str, Any]:
    """Every job succeeded, has one result row, and exactly one object under its key prefix."""
    ids = list(ids)
    rows = job_rows(engine, ids)
    assert {rows[j]["status"] for j in ids} == {"succeeded"}
    results = result_rows(engine, ids)
    assert sorted(r["job_id"] for r in results) == sorted(ids)
    for res in results:
        assert storage.list_keys(f"tenants/{tenant}/jobs/{res['job_id']}/") == [res["object_key"]]
    return rows


def test_lost_and_duplicated_tickets_end_with_each_job_done_once(
    engine: Engine,
    tenant: str,
    storage: Storage,
    broker: redis.Redis,
    cfg: Settings,
    survivor: Callable[[], WorkerProcess],
) -> None:
    broker.flushall()
    upload = make_upload(engine, storage, tenant)
    lost = [insert_job(engine, tenant, "understand", "what is this?", upload_id=upload) for _ in range(2)]
    lost.append(insert_job(engine, tenant, "edit", "add a moon", upload_id=upload))
    publish(cfg, [(task, bucket) for task, bucket in [("understand", lost[0][1]), ("edit", lost[2][1])]])
    broker.flushall()  # the broker forgets the wake-ups (restart without persistence)
    worker = survivor()

    dup = [insert_job(engine, tenant, "generate", f"twice {i}", seed=i) for i in range(3)]
    send_tickets(cfg, "generate", 3)  # three tickets for one batch: two spares claim nothing
    rows = wait_for(engine, [j for j, _ in dup], timeout_s=90)
    assert {r["attempt"] for r in rows.values()} == {1}, worker.tail()
    assert_done_once(engine, storage, tenant, [j for j, _ in dup])
    assert {r["status"] for r in job_rows(engine, [j for j, _ in lost]).values()} == {"queued"}

    # What beat sends every sweep_interval_s; the survivor's sweeper task re-publishes the tickets.
    make_publisher(cfg).send_task(TASK_SWEEP, queue=MAINTENANCE_QUEUE)
    wait_for(engine, [j for j, _ in lost], timeout_s=60)
    assert b"'tickets': 2" in worker.log_path.read_bytes()
    rows = assert_done_once(engine, storage, tenant, [j for j, _ in lost])
    assert {r["attempt"] for r in rows.values()} == {1}


def test_kill_9_mid_batch_every_job_completes_once_elsewhere(
    engine: Engine,
    tenant: str,
    storage: Storage,
    cfg: Settings,
    start_worker: Callable[..., WorkerProcess],
    survivor: Callable[[], WorkerProcess],
) -> None:
    backup = survivor()
    doomed = start_worker(cfg, "doomed", queues=[])  # only its private queue: it gets this batch alone
    warm(cfg, doomed)
    deadline = time.monotonic() + 60
    while b"model loaded" not in doomed.log_path.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)

    ids = [insert_job(engine, tenant, "generate", f"long {i}", seed=i, steps=60)[0] for i in range(4)]
    send_tickets(cfg, "generate", 1, queue=doomed.private_queue)
    deadline = time.monotonic() + 60
    victim: dict[str, Any] = {}
    while time.monotonic() < deadline:
        victim = dict(job_rows(engine, ids[:1])[ids[0]])
        if victim["stage"] == "denoising" and (victim["step"] or 0) >= 2:
            break
        time.sleep(0.05)
    assert victim["stage"] == "denoising", doomed.tail()
    time.sleep(0.8)  # the heartbeat keeps the short lease ahead while the batch runs
    renewed = job_rows(engine, ids[:1])[ids[0]]["lease_expires_at"]
    assert renewed > victim["lease_expires_at"]
    doomed.kill()
    assert {r["status"] for r in job_rows(engine, ids).values()} == {"running"}

    publisher = make_publisher(cfg)
    rows = wait_for(engine, ids, timeout_s=120, between=lambda: sweep(engine, publisher, cfg))
    rows = assert_done_once(engine, storage, tenant, ids)
    for job in ids:
        prov = rows[job]["provenance"]
        assert (rows[job]["attempt"], prov["attempt"]) == (2, 2), backup.tail()
        assert prov["worker"] != victim["lease_owner"]
        assert prov["batch_size"] == 4
    assert len(storage.list_keys(f"tenants/{tenant}/")) == len(ids)
    with engine.connect() as conn:  # nothing left holding a lease
        assert conn.execute(select(func.count()).where(jobs.c.status == "running")).scalar() == 0
