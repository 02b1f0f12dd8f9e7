"""A tensor-parallel worker through the whole service on CPU: API -> Postgres -> broker -> worker -> S3.

The worker runs NEXUSGEN_ENGINE=deepspeed NEXUSGEN_TP_SIZE=2 (two gloo ranks, rank 1 started by the
Celery model process itself). It must give what a one-rank worker gives, stop a canceled job mid-denoise
on both ranks, and, when rank 1 is killed mid-batch, exit non-zero within the timeout naming the rank;
a fresh worker then completes every job exactly once.
"""

from __future__ import annotations

import io
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import psutil
import pytest
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import Engine

from core.queue import make_publisher
from core.settings import Settings
from core.storage import Storage
from tests.support.api import new_tenant
from tests.worker.support import WorkerProcess, job_rows, result_rows, wait_for
from worker.sweeper import sweep

SMALL = {"width": 256, "height": 256, "steps": 2}


@pytest.fixture(scope="module")
def cfg(settings: Settings) -> Settings:
    return settings.with_overrides(
        engine="deepspeed",
        tp_size=2,
        tp_timeout_s=30,
        max_batch=8,
        batch_window_s=0.5,
        lease_s=30,  # long enough for a loaded CPU; the killed worker below holds 4 s leases
        heartbeat_s=0.5,
        progress_interval_s=0.1,
        requeue_after_s=0,
    )


@pytest.fixture(scope="module")
def tp2(cfg: Settings, start_worker: Callable[..., WorkerProcess]) -> WorkerProcess:
    return start_worker(cfg, "tp2", preload=True)


@pytest.fixture
def api(cfg: Settings, engine: Engine, clean_db: Any) -> Iterator[tuple[FlaskClient, dict[str, str]]]:
    from api.app import create_app

    app = create_app(cfg)
    app.config["TESTING"] = True
    yield app.test_client(), new_tenant(engine, "tp").headers


def upload_picture(client: FlaskClient, headers: dict[str, str]) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.arange(64 * 96 * 3, dtype=np.uint8).reshape(64, 96, 3)).save(buf, "PNG")
    r = client.post(
        "/v1/uploads", data={"file": (io.BytesIO(buf.getvalue()), "in.png")}, headers=headers,
        content_type="multipart/form-data",
    )  # fmt: skip
    assert r.status_code == 201, r.get_json()
    return str(r.get_json()["id"])


def submit(client: FlaskClient, headers: dict[str, str], jobs: list[dict[str, Any]]) -> list[str]:
    r = client.post("/v1/batches", json={"jobs": jobs}, headers=headers)
    assert r.status_code == 201, r.get_json()
    listed = client.get(f"/v1/jobs?batch_id={r.get_json()['id']}", headers=headers).get_json()
    by_key = {j["metadata"]["key"]: j["id"] for j in listed["data"]}
    return [by_key[j["metadata"]["key"]] for j in jobs]


def mixed_jobs(upload: str) -> list[dict[str, Any]]:
    image = {"image": upload}
    jobs = [
        {"task": "generate", "prompt": "a lighthouse at dawn", "params": {**SMALL, "seed": 1}},
        {"task": "generate", "prompt": "一座山上的寺庙", "params": {**SMALL, "seed": 2, "language": "zh"}},
        {"task": "edit", "instruction": "make the sky purple", **image, "params": {**SMALL, "seed": 3}},
        {
            "task": "edit",
            "instruction": "a sketch",
            **image,
            "params": {**SMALL, "seed": 4, "decoder": "generation"},
        },
        {
            "task": "understand",
            "instruction": "describe this image",
            **image,
            "params": {"max_new_tokens": 8},
        },
    ]
    return [{**job, "metadata": {"key": str(i)}} for i, job in enumerate(jobs)]


def outputs(engine: Engine, storage: Storage, ids: list[str]) -> list[Any]:
    """Each job's PNG as an array, or its text, in job order."""
    results = {r["job_id"]: r for r in result_rows(engine, ids)}
    out: list[Any] = []
    for job in ids:
        data = storage.get_bytes(results[job]["object_key"])
        out.append(
            data.decode() if results[job]["kind"] == "text" else np.asarray(Image.open(io.BytesIO(data)))
        )
    return out


def test_two_ranks_give_what_one_rank_gives(
    cfg: Settings,
    engine: Engine,
    storage: Storage,
    api: tuple[FlaskClient, dict[str, str]],
    tp2: WorkerProcess,
    start_worker: Callable[..., WorkerProcess],
) -> None:
    client, headers = api
    jobs = mixed_jobs(upload_picture(client, headers))
    tp_ids = submit(client, headers, jobs)
    rows = wait_for(engine, tp_ids, timeout_s=300)
    assert {r["status"] for r in rows.values()} == {"succeeded"}, tp2.tail()
    for job in tp_ids:
        prov = rows[job]["provenance"]
        assert (prov["engine"], prov["tp_size"]) == ("deepspeed", 2)
    tp_out = outputs(engine, storage, tp_ids)

    tp2.stop()  # the one-rank worker gets the machine's cores and the same jobs
    one = start_worker(cfg.with_overrides(engine="torch", tp_size=None), "tp1")
    one_ids = submit(client, headers, jobs)
    rows = wait_for(engine, one_ids, timeout_s=300)
    assert {r["status"] for r in rows.values()} == {"succeeded"}, one.tail()
    assert {(rows[j]["provenance"]["engine"], rows[j]["provenance"]["tp_size"]) for j in one_ids} == {
        ("torch", 1)
    }
    one_out = outputs(engine, storage, one_ids)
    one.stop()

    report = []
    for job, a, b in zip(jobs, tp_out, one_out, strict=True):
        if isinstance(a, str):
            assert a == b, job
            continue
        diff = np.abs(a.astype(int) - b.astype(int))
        report.append((job["task"], int(diff.max()), float((diff > 0).mean())))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.001, (job, report)
    print("TP-2 vs TP-1 (task, max |diff|, share of differing pixel values):", report)


def rank_process(worker: WorkerProcess, rank: int) -> psutil.Process:
    """The `python -m worker.ranks RANK ...` process the worker's model process started."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for proc in psutil.Process(worker.proc.pid).children(recursive=True):
            cmd = proc.cmdline()
            if "worker.ranks" in cmd and cmd[cmd.index("worker.ranks") + 1] == str(rank):
                return proc
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} process under the worker:\n{worker.tail()}")


def wait_for_denoising(engine: Engine, ids: list[str], timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(r["stage"] == "denoising" for r in job_rows(engine, ids).values()):
            return
        time.sleep(0.1)
    raise AssertionError("no job reached denoising")


def test_cancel_mid_denoise_with_two_ranks(
    cfg: Settings,
    engine: Engine,
    api: tuple[FlaskClient, dict[str, str]],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    client, headers = api
    worker = start_worker(cfg, "tp2-cancel")
    steps = 60
    jobs = [
        {
            "task": "generate",
            "prompt": f"slow {i}",
            "params": {**SMALL, "steps": steps, "seed": i},
            "metadata": {"key": str(i)},
        }
        for i in range(3)
    ]
    ids = submit(client, headers, jobs)
    victim = ids[1]
    deadline, seen = time.monotonic() + 240, {}
    while time.monotonic() < deadline:
        seen = dict(job_rows(engine, [victim])[victim])
        if seen["stage"] == "denoising" and (seen["step"] or 0) >= 2:
            break
        time.sleep(0.1)
    assert seen["stage"] == "denoising", worker.tail()
    r = client.post(f"/v1/jobs/{victim}/cancel", headers=headers)
    assert r.status_code == 200, r.get_json()
    rows = wait_for(engine, ids, timeout_s=300)
    assert rows[victim]["status"] == "canceled", worker.tail()
    assert 2 <= rows[victim]["step"] < steps
    assert result_rows(engine, [victim]) == []
    for job in (ids[0], ids[2]):
        assert rows[job]["status"] == "succeeded"
        assert (rows[job]["provenance"]["batch_size"], rows[job]["provenance"]["tp_size"]) == (3, 2)
    assert worker.proc.poll() is None  # both ranks carry on
    worker.stop()


def test_killed_rank_ends_the_worker_and_a_restart_completes_every_job_once(
    cfg: Settings,
    engine: Engine,
    storage: Storage,
    api: tuple[FlaskClient, dict[str, str]],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    client, headers = api
    worker = start_worker(cfg.with_overrides(lease_s=4), "tp2-kill")  # its jobs come back 4 s after it dies
    jobs = [
        {
            "task": "generate",
            "prompt": f"job {i}",
            "params": {**SMALL, "steps": 12, "seed": i},
            "metadata": {"key": str(i)},
        }
        for i in range(3)
    ]
    ids = submit(client, headers, jobs)
    wait_for_denoising(engine, ids)
    rank1 = rank_process(worker, 1)
    killed_at = time.monotonic()
    os.kill(rank1.pid, signal.SIGKILL)
    code = worker.proc.wait(timeout=cfg.tp_timeout_s + 30)
    took = time.monotonic() - killed_at
    log = worker.tail(20000)
    assert code != 0, log
    assert took < cfg.tp_timeout_s + 15, took
    assert "tensor-parallel rank 1" in log and "SIGKILL" in log, log
    assert {r["status"] for r in job_rows(engine, ids).values()} == {"running"}  # nothing failed

    restarted = start_worker(cfg, "tp2-restarted")
    publisher = make_publisher(cfg)
    rows = wait_for(engine, ids, timeout_s=600, between=lambda: sweep(engine, publisher, cfg))
    assert {r["status"] for r in rows.values()} == {"succeeded"}, restarted.tail()
    assert {r["attempt"] for r in rows.values()} == {2}
    results = result_rows(engine, ids)
    assert sorted(r["job_id"] for r in results) == sorted(ids)
    for res in results:
        tenant = rows[res["job_id"]]["tenant_id"]
        assert storage.list_keys(f"tenants/{tenant}/jobs/{res['job_id']}/") == [res["object_key"]]
    print(f"rank 1 killed -> worker exited {code} after {took:.1f}s (timeout {cfg.tp_timeout_s}s)")

    # a hung rank (stopped, still alive): rank 0's collective times out and the worker exits the same way
    hang_job = {**jobs[0], "params": {**SMALL, "steps": 40, "seed": 9}, "metadata": {"key": "hang"}}
    more = submit(client, headers, [hang_job])
    wait_for_denoising(engine, more)
    hung = rank_process(restarted, 1)
    hung.suspend()
    stopped_at = time.monotonic()
    code = restarted.proc.wait(timeout=cfg.tp_timeout_s + 60)
    took = time.monotonic() - stopped_at
    log = restarted.tail(20000)
    assert code != 0 and took < cfg.tp_timeout_s + 20, (code, took, log)
    assert "tensor-parallel rank 1" in log and "hung" in log, log
    assert not hung.is_running() or hung.status() == psutil.STATUS_ZOMBIE  # the worker killed it
    print(f"rank 1 stopped -> worker exited {code} after {took:.1f}s (timeout {cfg.tp_timeout_s}s)")
