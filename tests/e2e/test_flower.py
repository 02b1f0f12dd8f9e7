"""What an admin sees in Flower while `nexusgen up` runs batches: one task per model batch, failures, depth.

Real processes throughout (API, Postgres, Redis, S3, model worker, webhook worker, beat, Flower with a
login and a URL prefix); only Flower's own HTTP API is read for what Flower shows.
"""

from __future__ import annotations

import ast
import io
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import Engine, func, select

from core.db import make_engine
from core.queue import MODEL_QUEUES, TASK_RUN_BATCH
from core.schema import jobs, uploads
from core.settings import Settings
from core.storage import Storage
from nexusgen.client import Client
from nexusgen.demo import create_demo_tenant

MAX_BATCH = 2
STACK = {
    "NEXUSGEN_MAX_BATCH": str(MAX_BATCH),
    "NEXUSGEN_LEASE_S": "6",
    "NEXUSGEN_HEARTBEAT_S": "1",
    "NEXUSGEN_SWEEP_INTERVAL_S": "2",
    "NEXUSGEN_REQUEUE_AFTER_S": "120",  # no lost tickets here: the sweeper tops up only after requeues
    "FLOWER_BASIC_AUTH": "admin:s3cret",
    "FLOWER_URL_PREFIX": "flower",
}
TERMINAL = ("succeeded", "failed", "canceled")


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (20, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


def generate(prompt: str, steps: int = 2, seed: int = 0) -> dict[str, Any]:
    params = {"width": 256, "height": 256, "steps": steps, "seed": seed}
    return {"task": "generate", "prompt": prompt, "params": params}


class Flower:
    """Flower's HTTP API behind its login and URL prefix."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(auth=("admin", "s3cret"), timeout=10)

    def get(self, path: str, **params: Any) -> Any:
        response = self.http.get(self.url + path, params=params)
        response.raise_for_status()
        return response.json()

    def batch_tasks(self) -> dict[str, dict[str, Any]]:
        """The run_batch tasks Flower lists, by task id."""
        tasks = self.get("/api/tasks")
        return {uuid: t for uuid, t in tasks.items() if str(t.get("name", "")).startswith(TASK_RUN_BATCH)}

    def model_worker(self) -> dict[str, Any]:
        workers = self.get("/api/workers", refresh="true")
        (name,) = [n for n in workers if n.startswith("model@")]
        return dict(workers[name])


def wait(what: Any, timeout_s: float, message: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s {message}")


def wait_jobs(client: Client, batch_id: str, timeout_s: float = 240) -> list[dict[str, Any]]:
    def done() -> list[dict[str, Any]] | None:
        found = list(client.iter_jobs(batch_id=batch_id))
        return found if all(j["status"] in TERMINAL for j in found) else None

    return wait(done, timeout_s, f"for batch {batch_id}")  # type: ignore[no-any-return]


def jobs_of(task: dict[str, Any]) -> list[str]:
    return list(ast.literal_eval(task["kwargs"])["jobs"])


def outcomes_of(task: dict[str, Any]) -> dict[str, str]:
    return dict(ast.literal_eval(task["result"])["jobs"])


def queued(engine: Engine, task: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).where(jobs.c.status == "queued", jobs.c.task == task)
            ).scalar_one()
        )


@pytest.mark.slow
def test_flower_shows_each_batch_its_failures_and_the_backlog(up_process: Any, tiny_checkpoint: Path) -> None:
    run = up_process(**STACK, NEXUSGEN_MODEL_DIR=str(tiny_checkpoint), NEXUSGEN_PREFIX_MODE="forced")
    info = run.start()
    assert info["flower_url"].endswith("/flower")
    flower = Flower(info["flower_url"])
    wait(lambda: httpx.get(info["flower_url"] + "/api/workers").status_code == 401, 60, "for Flower")
    worker_log = run.state_dir / "logs" / "worker-model.log"
    wait(lambda: b"model loaded" in worker_log.read_bytes(), 120, "for the preloaded model")
    env = info["env"]
    settings = Settings.from_env(env)
    engine = make_engine(settings, pool_size=1)
    _, _, key = create_demo_tenant(env["DATABASE_URL"])
    client = Client(info["api_url"], key)

    # 1. A mixed batch: generate (3 jobs: batches of 2 and 1), edit (2 jobs, one whose input image is
    #    gone from storage: it fails alone inside its batch), understand (1 job). Four batches.
    image, gone = client.upload(png()), client.upload(png())
    with engine.connect() as conn:
        gone_key = conn.execute(select(uploads.c.object_key).where(uploads.c.id == gone)).scalar_one()
    Storage.from_settings(settings).delete(gone_key)
    edit = {"task": "edit", "params": {"width": 256, "height": 256, "steps": 2, "decoder": "edit"}}
    batch = client.create_batch(
        [
            *(generate(f"a test card {i}", seed=i) for i in range(3)),
            {**edit, "instruction": "add a hat", "image": image},
            {**edit, "instruction": "add a moon", "image": gone},
            {"task": "understand", "instruction": "what is this?", "image": image},
        ]
    )
    done = {j["id"]: j for j in wait_jobs(client, batch["id"])}
    failed = [j for j in done.values() if j["status"] == "failed"]
    assert len(done) == 6 and len(failed) == 1, done
    assert failed[0]["error"]["code"] == "invalid_input"

    def four_finished() -> dict[str, dict[str, Any]] | None:
        tasks = flower.batch_tasks()
        return tasks if sum(t["state"] == "SUCCESS" for t in tasks.values()) == 4 else None

    tasks = wait(four_finished, 60, "for four finished batch tasks in Flower")
    assert len(tasks) == 4, tasks
    assert sorted(j for t in tasks.values() for j in jobs_of(t)) == sorted(done)
    for task in tasks.values():
        outcomes = outcomes_of(task)
        assert sorted(outcomes) == sorted(jobs_of(task))  # the result names the jobs of the arguments
        for job_id, outcome in outcomes.items():
            expected = "succeeded" if done[job_id]["status"] == "succeeded" else "failed: invalid_input"
            assert outcome == expected
        assert task["worker"].startswith("model@") and task["runtime"] > 0
        assert "steps" in task["name"] or "understand" in task["name"]
        assert ast.literal_eval(task["result"])["device"] == "cpu"
    assert flower.model_worker()["stats"]["total"] == {TASK_RUN_BATCH: 4}

    # 2. A batch whose model process is killed: FAILURE (WorkerLostError) in Flower; its jobs come back
    #    after their lease and run as a new batch task, attempt 2.
    slow = client.create_batch([generate(f"slow {i}", steps=60, seed=i) for i in range(2)])
    slow_ids = [j["id"] for j in client.iter_jobs(batch_id=slow["id"])]

    def running_owner() -> str | None:
        with engine.connect() as conn:
            row = conn.execute(
                select(jobs.c.lease_owner, jobs.c.step).where(jobs.c.id == slow_ids[0])
            ).first()
        return row.lease_owner if row is not None and (row.step or 0) >= 2 else None

    owner = wait(running_owner, 120, "for the slow batch to denoise")
    _node, pid, killed_task = owner.split("/")
    os.kill(int(pid), signal.SIGKILL)
    rerun = {j["id"]: j for j in wait_jobs(client, slow["id"])}
    assert {j["status"] for j in rerun.values()} == {"succeeded"}
    assert {client.get_job(j)["provenance"]["attempt"] for j in slow_ids} == {2}
    lost = wait(lambda: flower.batch_tasks().get(killed_task, {}).get("state") == "FAILURE", 30)
    assert lost
    lost_task = flower.batch_tasks()[killed_task]
    # Celery reports this exception wrapped (ExceptionWithTraceback()); its traceback names it
    assert "WorkerLostError" in f"{lost_task['exception']} {lost_task['traceback']}", lost_task
    assert sorted(jobs_of(lost_task)) == sorted(slow_ids)
    again = [
        t for t in flower.batch_tasks().values() if t["state"] == "SUCCESS" and slow_ids[0] in jobs_of(t)
    ]
    assert len(again) == 1 and sorted(outcomes_of(again[0])) == sorted(slow_ids)

    # 3. A backlog draining: Flower's broker view counts one message per batch the queued jobs make.
    backlog = client.create_batch([generate(f"backlog {i}", steps=8, seed=i) for i in range(10)])
    samples = []  # (queued jobs before, broker depth, queued jobs after)
    while True:
        before = queued(engine, "generate")
        lengths = flower.get("/api/queues/length")["active_queues"]
        depth = {q["name"]: q["messages"] for q in lengths}.get(MODEL_QUEUES["generate"], 0)
        samples.append((before, depth, queued(engine, "generate")))
        if before == 0:
            break
        time.sleep(0.5)
    assert len([s for s in samples if s[0] > 0]) >= 3, samples
    for before, depth, after in samples:  # one less while a taken ticket has not claimed yet
        assert -(-after // MAX_BATCH) - 1 <= depth <= -(-before // MAX_BATCH), samples
    wait_jobs(client, backlog["id"])
    engine.dispose()
