"""A real Celery worker process on the tiny checkpoint: bulk batches, bad input, cancellation, progress."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery
from PIL import Image
from sqlalchemy import Engine

from core.db import transaction
from core.jobs import cancel_job
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
)

PROVENANCE_KEYS = {"params", "checkpoint_hash", "batch_size", "timings", "worker", "attempt", "task"}


@pytest.fixture(scope="module")
def cfg(settings: Settings) -> Settings:
    return settings.with_overrides(
        max_batch=4,
        batch_window_s=0.3,
        lease_s=30,
        heartbeat_s=0.5,
        progress_interval_s=0.1,
        result_backend=settings.broker_url,  # the tests read each batch task's result
    )


@pytest.fixture(scope="module")
def worker(cfg: Settings, start_worker: Callable[..., WorkerProcess]) -> WorkerProcess:
    return start_worker(cfg, "solo", preload=True)


def test_mixed_bulk_submission_runs_in_batches(
    engine: Engine, tenant: str, storage: Storage, cfg: Settings, worker: WorkerProcess
) -> None:
    upload = make_upload(engine, storage, tenant)
    specs: list[tuple[str, str, dict[str, Any]]] = [
        ("generate", "a lighthouse at dawn", {"seed": 1}),
        ("generate", "a red bicycle", {"seed": 2}),
        ("generate", "一座山上的寺庙", {"seed": 3, "language": "zh"}),
        ("generate", "一只橘猫", {"seed": 4, "language": "zh"}),
        ("edit", "make the sky purple", {"decoder": "edit"}),
        ("edit", "add a hat", {"decoder": "edit"}),
        ("edit", "turn it into a sketch", {"decoder": "generation"}),
        ("edit", "make it night", {"decoder": "generation"}),
        ("understand", "describe this image", {}),
        ("understand", "what colour dominates?", {}),
    ]
    ids, wakeups = [], set()
    for task, prompt, params in specs:
        job, bucket = insert_job(
            engine, tenant, task, prompt, upload_id=upload if task != "generate" else None, **params
        )
        ids.append(job)
        wakeups.add((task, bucket))
    publish(cfg, wakeups)
    rows = wait_for(engine, ids, timeout_s=90)
    assert {r["status"] for r in rows.values()} == {"succeeded"}, worker.tail()

    results = {r["job_id"]: r for r in result_rows(engine, ids)}
    assert sorted(results) == sorted(ids)
    for job in ids:
        row, res, prov = rows[job], results[job], rows[job]["provenance"]
        assert set(prov) >= PROVENANCE_KEYS, prov
        assert prov["attempt"] == 1 and prov["task"] == row["task"]
        assert prov["batch_size"] == 2 if row["task"] != "generate" else prov["batch_size"] == 4
        assert storage.list_keys(f"tenants/{tenant}/jobs/{job}/") == [res["object_key"]]
        data = storage.get_bytes(res["object_key"])
        if row["task"] == "understand":
            assert res["kind"] == "text" and data.decode() == res["text"]
            assert prov["params"]["max_new_tokens"] == 8
        else:
            image = Image.open(io.BytesIO(data))
            assert (image.format, image.size) == ("PNG", (256, 256))
            assert (res["width"], res["height"]) == (256, 256)
            assert prov["seed"] == row["params"]["seed"]
            assert prov["params"]["steps"] == 2
            assert {"denoise_s", "upload_s"} <= set(prov["timings"])
    assert {rows[j]["provenance"]["decoder"] for j in ids[4:8]} == {"edit", "generation"}


def test_bad_input_fails_only_its_own_job(
    engine: Engine, tenant: str, storage: Storage, cfg: Settings, worker: WorkerProcess
) -> None:
    good = make_upload(engine, storage, tenant)
    broken = make_upload(engine, storage, tenant, data=b"this is not an image")
    ok, bucket = insert_job(engine, tenant, "edit", "add a hat", upload_id=good)
    bad_image, _ = insert_job(engine, tenant, "edit", "add a hat", upload_id=broken)
    bad_text, _ = insert_job(engine, tenant, "edit", "  ", upload_id=good)
    publish(cfg, [("edit", bucket)])
    rows = wait_for(engine, [ok, bad_image, bad_text], timeout_s=60)
    assert rows[ok]["status"] == "succeeded"
    for job in (bad_image, bad_text):
        assert (rows[job]["status"], rows[job]["error_code"]) == ("failed", "invalid_input")
    assert "not a readable image" in rows[bad_image]["error_message"]
    assert "instruction" in rows[bad_text]["error_message"]
    assert rows[ok]["provenance"]["batch_size"] == 1


def test_cancel_while_queued_never_starts(
    engine: Engine, tenant: str, cfg: Settings, worker: WorkerProcess
) -> None:
    canceled, bucket = insert_job(engine, tenant, "generate", "never", seed=7)
    kept, _ = insert_job(engine, tenant, "generate", "kept", seed=8)
    with transaction(engine) as conn:
        assert cancel_job(conn, tenant, canceled).status == "canceled"  # type: ignore[union-attr]
    publish(cfg, [("generate", bucket)])
    rows = wait_for(engine, [kept], timeout_s=60)
    assert rows[kept]["status"] == "succeeded"
    assert rows[kept]["provenance"]["batch_size"] == 1
    row = job_rows(engine, [canceled])[canceled]
    assert (row["status"], row["started_at"], row["attempt"]) == ("canceled", None, 0)
    assert result_rows(engine, [canceled]) == []


def test_cancel_while_running_stops_at_a_step_and_mates_finish(
    engine: Engine, tenant: str, storage: Storage, cfg: Settings, worker: WorkerProcess
) -> None:
    steps = 100
    ids = []
    for seed in range(3):
        job, bucket = insert_job(engine, tenant, "generate", f"slow {seed}", seed=seed, steps=steps)
        ids.append(job)
    victim = ids[1]
    publish(cfg, [("generate", bucket)])
    deadline = time.monotonic() + 60
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:  # progress shows denoising k/N while the batch runs
        seen = dict(job_rows(engine, [victim])[victim])
        if seen["stage"] == "denoising" and (seen["step"] or 0) >= 2:
            break
        time.sleep(0.05)
    assert seen["stage"] == "denoising" and seen["total_steps"] == steps, worker.tail()
    assert 0.15 < seen["progress"] < 0.9
    with transaction(engine) as conn:
        assert cancel_job(conn, tenant, victim).status == "running"  # type: ignore[union-attr]
    rows = wait_for(engine, ids, timeout_s=90)
    assert rows[victim]["status"] == "canceled"
    assert 2 <= rows[victim]["step"] < steps  # stopped at a step boundary, not at the end
    assert result_rows(engine, [victim]) == []
    assert storage.list_keys(f"tenants/{tenant}/jobs/{victim}/") == []
    for job in (ids[0], ids[2]):
        assert rows[job]["status"] == "succeeded"
        assert rows[job]["provenance"]["batch_size"] == 3


def results_app(cfg: Settings) -> Celery:
    """A client that reads task results and sends control commands, as Flower does."""
    return Celery("test-client", broker=cfg.broker_url, backend=cfg.result_backend)


def test_each_batch_is_one_task_whose_result_names_its_jobs(
    engine: Engine, tenant: str, cfg: Settings, worker: WorkerProcess
) -> None:
    good = [insert_job(engine, tenant, "generate", f"a kite {i}", seed=i)[0] for i in range(2)]
    blank, bucket = insert_job(engine, tenant, "generate", "   ")  # fails alone, as invalid input
    first, spare = send_tickets(cfg, "generate", 2)  # the second ticket finds nothing left
    client = results_app(cfg)
    result = client.AsyncResult(first).get(timeout=90)
    assert result["size"] == 3 and result["bucket"] == bucket
    assert result["jobs"] == {good[0]: "succeeded", good[1]: "succeeded", blank: "failed: invalid_input"}
    assert result["device"] == "cpu"
    assert client.AsyncResult(spare).get(timeout=30)["size"] == 0
    rows = job_rows(engine, [*good, blank])
    assert [rows[j]["status"] for j in [*good, blank]] == ["succeeded", "succeeded", "failed"]
    owner = rows[good[0]]["provenance"]["worker"]
    assert owner == result["worker"]


def test_revoking_a_running_batch_cancels_its_jobs_at_a_step(
    engine: Engine, tenant: str, cfg: Settings, worker: WorkerProcess
) -> None:
    steps = 100
    ids = [insert_job(engine, tenant, "generate", f"slow {i}", seed=i, steps=steps)[0] for i in range(2)]
    (ticket,) = send_tickets(cfg, "generate", 1)
    deadline = time.monotonic() + 60
    seen: dict[str, Any] = {}
    while time.monotonic() < deadline:
        seen = dict(job_rows(engine, ids[:1])[ids[0]])
        if seen["stage"] == "denoising" and (seen["step"] or 0) >= 2:
            break
        time.sleep(0.05)
    assert seen["stage"] == "denoising", worker.tail()
    client = results_app(cfg)
    replies = client.control.revoke(ticket, reply=True, timeout=5)
    assert any("cancel requested for 2 job(s)" in str(r) for r in replies), replies
    result = client.AsyncResult(ticket).get(timeout=90)
    assert result["jobs"] == {ids[0]: "canceled", ids[1]: "canceled"}
    rows = job_rows(engine, ids)
    assert all(rows[j]["status"] == "canceled" and rows[j]["step"] < steps for j in ids)
