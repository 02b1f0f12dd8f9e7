"""A 10,000-line JSONL batch: one COPY, a quick answer, batch tickets after the commit, broker outages."""

from __future__ import annotations

import gc
import json
import threading
import time
from typing import Any

import redis
from celery.signals import before_task_publish
from sqlalchemy import event, func, select

from core.queue import MODEL_QUEUES, TOP_UP_MAX_PUBLISH
from core.schema import jobs
from tests.api.conftest import Tenant

N = 10_000


def _body(n: int) -> bytes:
    sizes = [(512, 512), (768, 512), (1024, 1024)]
    lines = []
    for i in range(n):
        width, height = sizes[i % 3]
        lines.append(
            json.dumps(
                {
                    "task": "generate",
                    "prompt": f"prompt {i}",
                    "params": {"width": width, "height": height, "steps": 20},
                    "custom_id": f"row-{i}",
                }
            )
        )
    return "\n".join(lines).encode()


def _count_jobs(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(jobs)).scalar_one())


def test_ten_thousand_jobs_in_few_statements_then_one_ticket_per_batch(
    app: Any, acme: Tenant, engine: Any, redis_url: str
) -> None:
    broker = redis.Redis.from_url(redis_url)
    broker.delete(MODEL_QUEUES["generate"])
    statements: list[str] = []
    app_engine = app.extensions["nexusgen"].engine
    event.listen(app_engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    visible_at_publish: list[int] = []

    def on_publish(**_: Any) -> None:  # the jobs must be committed before the first ticket leaves
        if not visible_at_publish:
            visible_at_publish.append(_count_jobs(engine))

    before_task_publish.connect(on_publish, weak=False)
    try:
        started = time.monotonic()
        r = app.test_client().post(
            "/v1/batches", data=_body(N), headers={**acme.headers, "Content-Type": "application/x-ndjson"}
        )
        elapsed = time.monotonic() - started
    finally:
        before_task_publish.disconnect(on_publish)
    assert r.status_code == 201, r.get_json()
    assert r.get_json()["total_jobs"] == N and _count_jobs(engine) == N
    # one COPY for the jobs (through the driver, so not among these): a handful of statements, not 10,000
    assert not [s for s in statements if s.lstrip().upper().startswith("INSERT INTO JOBS")]
    assert len(statements) < 30, len(statements)
    assert elapsed < 30, elapsed  # a few seconds on a quiet machine; generous for shared CI cores
    assert visible_at_publish == [N]
    # three buckets (sizes) of 3334, 3333 and 3333 jobs make more batches than a request publishes
    # tickets for: it sends its share, finished batches and the sweeper send the rest
    assert broker.llen(MODEL_QUEUES["generate"]) == TOP_UP_MAX_PUBLISH


def test_a_bulk_request_runs_no_cyclic_collection(client: Any, acme: Tenant) -> None:
    # 2,000 lines keep about 12,000 containers alive, the collector's first threshold 17 times over: without
    # the pause (core.ingest.cyclic_gc_paused) it ran 32 times in this request; with it, only before and after
    me = threading.get_ident()
    collections: list[int] = []

    def record(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and threading.get_ident() == me:
            collections.append(info["generation"])

    gc.callbacks.append(record)
    try:
        r = client.post(
            "/v1/batches", data=_body(2000), headers={**acme.headers, "Content-Type": "application/x-ndjson"}
        )
    finally:
        gc.callbacks.remove(record)
    assert r.status_code == 201, r.get_json()
    assert len(collections) <= 4, collections  # a few in the request's own setup and answer
    assert gc.isenabled()


def test_broker_down_the_jobs_stay_queued_and_the_request_succeeds(
    settings: Any, engine: Any, clean_db: Any, acme: Tenant
) -> None:
    from api.app import create_app

    client = create_app(settings.with_overrides(broker_url="redis://127.0.0.1:1/0")).test_client()
    started = time.monotonic()
    r = client.post(
        "/v1/batches", data=_body(50), headers={**acme.headers, "Content-Type": "application/x-ndjson"}
    )
    assert r.status_code == 201, r.get_json()
    assert time.monotonic() - started < 15
    with engine.connect() as conn:
        statuses = conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status)).all()
    assert statuses == [("queued", 50)]
    r = client.post("/v1/jobs", json={"task": "generate", "prompt": "x"}, headers=acme.headers)
    assert r.status_code == 201
