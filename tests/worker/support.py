"""Helpers for worker tests and the service benchmark: job rows, uploads, worker processes, waiting."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import Engine, RowMapping, select

from core.db import make_engine, transaction
from core.ids import new_id
from core.jobs import bucket_key
from core.queue import MODEL_QUEUES, TASK_RUN_BATCH, make_publisher, top_up
from core.schema import jobs, results, tenants, uploads
from core.settings import Settings
from core.storage import Storage, upload_key

REPO = Path(__file__).resolve().parents[2]
IMAGE_PARAMS = {"width": 256, "height": 256, "steps": 2, "guidance": 3.5, "language": "en"}


def settings_env(settings: Settings, **overrides: Any) -> dict[str, str]:
    """The environment under which Settings.from_env() gives `settings` (plus NEXUSGEN_* overrides)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEXUSGEN_", "S3_", "CELERY_"))}
    env.update(settings.to_env())
    for name, value in overrides.items():  # None removes a variable
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"  # two cores shared by everything in a test run
    return env


class WorkerProcess:
    """A real `celery worker` process (its own process group, so kill -9 takes the child too)."""

    def __init__(self, settings: Settings, name: str, log_dir: Path, queues: Iterable[str] | None = None):
        self.name = name
        self.private_queue = f"test.{name}"  # lets a test wake exactly this worker
        model_queues = list(queues) if queues is not None else [MODEL_QUEUES[t] for t in settings.tasks]
        self.log_path = log_dir / f"worker-{name}.log"
        argv = [
            sys.executable, "-m", "celery", "-A", "worker.app:celery_app", "worker",
            "--queues", ",".join([*model_queues, self.private_queue]),
            "--concurrency", "1", "--pool", "prefork", "--hostname", f"{name}@%h",
            "--without-gossip", "--without-mingle", "--loglevel", "INFO",
        ]  # fmt: skip
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=settings_env(settings),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if b" ready." in self.log_path.read_bytes():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"worker {self.name} did not start:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def kill(self) -> None:
        """kill -9 the whole worker (parent and prefork child), like a lost machine."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def warm(settings: Settings, worker: WorkerProcess, task: str = "generate") -> None:
    """Send one ticket to this worker only, so it loads the model before the test needs it."""
    send_tickets(settings, task, 1, queue=worker.private_queue)


def send_tickets(settings: Settings, task: str, n: int, queue: str | None = None) -> list[str]:
    """Publish `n` run_batch tickets for `task` as they are (tests duplicate or lose them at will)."""
    app = make_publisher(settings)
    return [
        app.send_task(TASK_RUN_BATCH, args=[task, None], queue=queue or MODEL_QUEUES[task]).id
        for _ in range(n)
    ]


def make_tenant(engine: Engine) -> str:
    tenant_id = new_id("ten")
    with transaction(engine) as conn:
        conn.execute(
            tenants.insert().values(id=tenant_id, name=f"t-{tenant_id}", webhook_secret="whsec_dGVzdA==")
        )
    return tenant_id


def make_upload(engine: Engine, storage: Storage, tenant_id: str, data: bytes | None = None) -> str:
    """Store an input image (a small PNG unless `data` is given) as an upload of the tenant."""
    if data is None:
        buf = io.BytesIO()
        Image.new("RGB", (96, 64), (200, 40, 40)).save(buf, format="PNG")
        data = buf.getvalue()
    upload_id = new_id("upl")
    key = upload_key(tenant_id, upload_id)
    digest = storage.put_bytes(key, data, "image/png")
    with transaction(engine) as conn:
        conn.execute(
            uploads.insert().values(
                id=upload_id,
                tenant_id=tenant_id,
                object_key=key,
                content_type="image/png",
                size_bytes=len(data),
                sha256=digest,
                width=96,
                height=64,
            )
        )
    return upload_id


def job_params(task: str, **params: Any) -> dict[str, Any]:
    """Normalised params like core.submit writes them (few steps, 256x256 by default)."""
    if task == "understand":
        return {"max_new_tokens": 8, **params}
    defaults = {**IMAGE_PARAMS, "cfg_scale": 3.0 if task == "generate" else 1.0, "seed": 1234}
    if task == "edit":
        defaults["decoder"] = "edit"
    return {**defaults, **params}


def insert_job(
    engine: Engine,
    tenant_id: str,
    task: str,
    prompt: str = "a red square",
    *,
    upload_id: str | None = None,
    priority: int = 0,
    columns: Mapping[str, Any] | None = None,
    **params: Any,
) -> tuple[str, str]:
    """Insert one queued job (no wake-up), with other `columns` of the row if given; (job id, bucket)."""
    p = job_params(task, **params)
    job_id, bucket = new_id("job"), bucket_key(task, p)
    with transaction(engine) as conn:
        conn.execute(
            jobs.insert().values(
                id=job_id,
                tenant_id=tenant_id,
                task=task,
                prompt=prompt,
                upload_id=upload_id,
                params=p,
                bucket=bucket,
                priority=priority,
                **(columns or {}),
            )
        )
    return job_id, bucket


def publish(settings: Settings, wakeups: Iterable[tuple[str, str | None]]) -> int:
    """Top the queues of these (task, bucket) pairs up, as the API does after a commit."""
    engine = make_engine(settings, pool_size=1)
    try:
        return top_up(engine, make_publisher(settings), settings.max_batch, {t for t, _ in wakeups})
    finally:
        engine.dispose()


def job_rows(engine: Engine, ids: Iterable[str]) -> dict[str, RowMapping]:
    with engine.connect() as conn:
        rows = conn.execute(select(jobs).where(jobs.c.id.in_(list(ids)))).mappings().all()
    return {r["id"]: r for r in rows}


def result_rows(engine: Engine, ids: Iterable[str]) -> list[RowMapping]:
    with engine.connect() as conn:
        return list(conn.execute(select(results).where(results.c.job_id.in_(list(ids)))).mappings().all())


def wait_for(
    engine: Engine,
    ids: Iterable[str],
    statuses: tuple[str, ...] = ("succeeded", "failed", "canceled"),
    timeout_s: float = 60,
    between: Any = None,
) -> dict[str, RowMapping]:
    """Poll until every job is in one of `statuses`; `between()` runs each round (e.g. a sweep)."""
    ids = list(ids)
    deadline = time.monotonic() + timeout_s
    while True:
        rows = job_rows(engine, ids)
        if all(rows[i]["status"] in statuses for i in ids):
            return rows
        if time.monotonic() > deadline:
            state = {i: (rows[i]["status"], rows[i]["stage"]) for i in ids}
            raise TimeoutError(f"jobs not {statuses} after {timeout_s}s: {state}")
        if between is not None:
            between()
        time.sleep(0.2)
