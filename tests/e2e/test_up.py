"""`nexusgen up` as users run it: embedded servers, a batch through the client, a restart mid-batch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nexusgen.client import Client
from nexusgen.demo import create_demo_tenant
from tests.e2e.conftest import port_in_use, stack_env

TERMINAL = ("succeeded", "failed", "canceled")
# Small, fast jobs; a batch of at most 2 per model call so that the batch spans several calls.
FAST = {
    "NEXUSGEN_MAX_BATCH": "2",
    "NEXUSGEN_LEASE_S": "6",
    "NEXUSGEN_HEARTBEAT_S": "1",
    "NEXUSGEN_SWEEP_INTERVAL_S": "2",
    "NEXUSGEN_REQUEUE_AFTER_S": "3",
}


def _jobs(n: int) -> list[dict[str, Any]]:
    params = {"width": 256, "height": 256, "steps": 2}
    return [
        {
            "custom_id": f"g{i}",
            "task": "generate",
            "prompt": f"a small test picture {i}",
            "params": {**params, "seed": i},
        }
        for i in range(n)
    ]


def _wait(client: Client, batch_id: str, until: Any, timeout_s: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = list(client.iter_jobs(batch_id=batch_id))
        if until(jobs):
            return jobs
        time.sleep(0.5)
    raise AssertionError(f"timed out; jobs: {[(j['custom_id'], j['status'], j['stage']) for j in jobs]}")


@pytest.mark.slow
def test_up_survives_a_restart_mid_batch(up_process: Any, tmp_path: Path, tiny_checkpoint: Path) -> None:
    first = up_process(**FAST, NEXUSGEN_MODEL_DIR=str(tiny_checkpoint), NEXUSGEN_PREFIX_MODE="forced")
    info = first.start()
    _, _, key = create_demo_tenant(info["env"]["DATABASE_URL"])
    client = Client(info["api_url"], key)
    batch = client.create_batch(_jobs(6))

    # A second `up` on the same state is refused while the first runs (and leaves its state file alone).
    command = [sys.executable, "-m", "nexusgen.cli", "up"]
    second_up = subprocess.run(command, env=first.env, capture_output=True, text=True, timeout=60)
    assert second_up.returncode == 1 and "another `nexusgen up`" in second_up.stderr
    assert (first.state_dir / "up.json").exists()

    # Stop the stack while the batch is under way: some jobs done or running, some still queued.
    started = _wait(
        client, batch["id"], lambda jobs: any(j["status"] in ("running", "succeeded") for j in jobs), 240
    )
    assert first.stop(signal.SIGTERM) == 0, first.log_tail()
    assert any(j["status"] in ("queued", "running") for j in started)  # really mid-batch
    assert not (first.state_dir / "up.json").exists()
    api_port, flower_port = int(first.env["NEXUSGEN_API_PORT"]), int(first.env["NEXUSGEN_FLOWER_PORT"])
    assert not port_in_use(api_port) and not port_in_use(flower_port)

    second = up_process()
    info = second.start()
    client = Client(info["api_url"], key)  # same state: same database, same key
    jobs = _wait(client, batch["id"], lambda jobs: all(j["status"] in TERMINAL for j in jobs), 300)
    assert sorted(j["status"] for j in jobs) == ["succeeded"] * 6, second.log_tail()
    assert client.get_batch(batch["id"])["status"] == "completed"
    out = tmp_path / "out"
    for job in jobs:
        path, _ = client.download_result(job, out)
        assert path.read_bytes().startswith(b"\x89PNG")
    _submit_wait_and_resume(info["api_url"], key, tmp_path)
    # Ctrl-C stops everything cleanly too
    assert second.stop(signal.SIGINT) == 0, second.log_tail()
    assert not port_in_use(api_port)
    logs = second.state_dir / "logs"
    assert {"api.log", "worker-model.log", "worker-webhooks.log", "beat.log", "flower.log"} <= {
        p.name for p in logs.iterdir()
    }
    assert (second.state_dir / "flower.db").exists() or any(second.state_dir.glob("flower.db*"))


def _submit_wait_and_resume(api_url: str, key: str, tmp_path: Path) -> None:
    """`nexusgen submit FILE --wait --out DIR` twice: the same batch, and nothing downloaded twice."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(job) for job in _jobs(2)) + "\n")
    env = dict(os.environ, NEXUSGEN_API_URL=api_url, NEXUSGEN_API_KEY=key)

    def nexusgen(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "nexusgen.cli", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)

    first = nexusgen("submit", str(jobs), "--wait", "--out", str(tmp_path / "results"))
    assert first.returncode == 0, first.stderr
    assert "2 downloaded, 0 already there" in first.stdout
    again = nexusgen("submit", str(jobs), "--out", str(tmp_path / "results"))
    assert again.returncode == 0, again.stderr
    assert "0 downloaded, 2 already there" in again.stdout
    batch_id = first.stdout.split("batch_id: ")[1].split()[0]
    assert f"batch_id: {batch_id}" in again.stdout  # the Idempotency-Key found the same batch
    status = nexusgen("status", batch_id)
    assert status.returncode == 0 and json.loads(status.stdout)["counts"]["succeeded"] == 2
    canceled = nexusgen("cancel", batch_id)  # finished jobs keep their results
    assert canceled.returncode == 0, canceled.stderr
    assert json.loads(nexusgen("status", batch_id).stdout)["counts"]["succeeded"] == 2
    missing = nexusgen("status", "job_doesnotexist")
    assert missing.returncode == 1 and "404" in missing.stderr


def test_up_refuses_a_taken_port_with_a_clear_error(stack_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = stack_env(stack_dir / "state", NEXUSGEN_API_PORT=str(taken.getsockname()[1]))
        result = subprocess.run(
            [sys.executable, "-m", "nexusgen.cli", "up"], env=env, capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 1
    assert "NEXUSGEN_API_PORT" in result.stderr and "in use" in result.stderr
