"""A real Celery worker process consuming WEBHOOK_QUEUE delivers a committed event after a kick."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select
from standardwebhooks import Webhook

from core.queue import make_publisher
from core.schema import webhook_attempts, webhook_deliveries
from core.webhooks import publish_delivery_kick
from tests.support.webhooks import start_job, succeed_job

pytestmark = pytest.mark.usefixtures("outside_connections")  # tests never leave the machine

_WORKER = (
    "from core.queue import WEBHOOK_QUEUE; from core.settings import Settings; "
    "from worker.app import run_worker; "
    "run_worker(Settings.from_env(), queues=[WEBHOOK_QUEUE], pool='solo', hostname='webhooks-test@localhost')"
)


def _env(settings: Any) -> dict[str, str]:
    env = dict(os.environ)
    env.update(settings.to_env())
    env.update(WEBHOOK_TIMEOUT_S="2", NEXUSGEN_PUBLIC_URL="http://api.test:8080")
    return env


@pytest.fixture
def webhook_worker(settings: Any, tmp_path: Any) -> Iterator[subprocess.Popen[bytes]]:
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - closed below, after the process ends
    proc = subprocess.Popen(
        [sys.executable, "-c", _WORKER], env=_env(settings), stdout=log, stderr=subprocess.STDOUT
    )
    yield proc
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def test_worker_process_delivers_after_a_kick(
    engine: Any, settings: Any, webhook_tenant: Any, make_receiver: Any, webhook_worker: Any, tmp_path: Any
) -> None:
    receiver = make_receiver()
    job_id, attempt = start_job(engine, webhook_tenant["id"], webhook_url=receiver.url + "/celery")
    succeed_job(engine, job_id, attempt, webhook_tenant["id"])
    publisher = make_publisher(settings)
    publish_delivery_kick(publisher)  # after the commit, as the worker does after finishing jobs

    deadline = time.monotonic() + 60
    while not receiver.received and time.monotonic() < deadline:
        assert webhook_worker.poll() is None, (tmp_path / "worker.log").read_text()
        time.sleep(0.2)
    assert receiver.received, (tmp_path / "worker.log").read_text()
    request = receiver.received[0]
    payload = Webhook(webhook_tenant["webhook_secret"]).verify(request.body, request.headers)
    assert payload["type"] == "job.succeeded" and payload["data"]["id"] == job_id
    assert payload["data"]["links"]["self"] == f"http://api.test:8080/v1/jobs/{job_id}"

    deadline = time.monotonic() + 10
    status = None
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            status = conn.execute(select(webhook_deliveries.c.status)).scalar_one()
            attempts = conn.execute(select(webhook_attempts.c.status_code)).scalars().all()
        if status == "succeeded":
            break
        time.sleep(0.2)
    assert status == "succeeded" and attempts == [200]
    assert len(receiver.received) == 1
