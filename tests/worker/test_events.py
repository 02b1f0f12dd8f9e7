"""Live status streams over real HTTP: a job run by a real worker shows every stage in order and its
stream ends at the terminal state; a resumed stream repeats nothing; a batch stream ends when the batch
completed; `nexusgen status --watch` follows the stream (idle streams: tests/api/test_event_streams.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, func, select

from core.schema import job_events
from core.settings import Settings
from nexusgen.cli import main as cli
from tests.support.api import http_client, serve
from tests.worker.support import WorkerProcess

STAGES = ["starting", "encoding", "denoising", "decoding", "uploading", "done"]


@pytest.fixture(scope="module")
def cfg(settings: Settings) -> Settings:
    return settings.with_overrides(
        max_batch=4,
        batch_window_s=0.2,
        lease_s=30,
        heartbeat_s=0.5,
        progress_interval_s=0.1,
        max_event_streams=250,
    )


@pytest.fixture(scope="module")
def worker(cfg: Settings, start_worker: Callable[..., WorkerProcess]) -> WorkerProcess:
    return start_worker(cfg, "events", preload=True)


@pytest.fixture
def server(cfg: Settings, engine: Engine, clean_db: Any) -> Iterator[tuple[str, Any]]:
    """The API on a loopback port (threaded, one thread per connection), and its app."""
    from api.app import create_app

    app = create_app(cfg)
    with serve(app) as url:
        yield url, app


def test_a_stream_shows_every_stage_in_order_and_resumes_without_repeats(
    engine: Engine, worker: WorkerProcess, server: tuple[str, Any]
) -> None:
    client = http_client(engine, server[0], "sse")
    job = client.create_job(
        {"task": "generate", "prompt": "a fox", "params": {"width": 256, "height": 256, "steps": 3}}
    )
    events = list(client.watch(job["id"]))
    assert events[-1].event == "end" and events[-1].data["status"] == "succeeded", worker.tail()
    states = [e for e in events if e.event == "state"]
    stages = [e.data["stage"] for e in states]
    assert [s for i, s in enumerate(stages) if i == 0 or s != stages[i - 1]] == STAGES  # each once, in order
    steps = [e.data["step"] for e in states if e.data["stage"] == "denoising"]
    assert steps == sorted(steps) and steps[-1] == 3 and states[-1].data["status"] == "succeeded"
    ids = [int(e.id) for e in states if e.id is not None]
    assert ids == sorted(set(ids))  # increasing, no repeats
    with engine.connect() as conn:
        logged = conn.execute(select(func.count()).where(job_events.c.job_id == job["id"])).scalar_one()
    assert logged == len(states)  # the stream showed every logged state

    # resume after the third state: exactly the rest, nothing repeated
    resumed = list(client.events(job["id"], last_event_id=states[2].id))
    assert [e.id for e in resumed if e.event == "state"] == [e.id for e in states[3:]]
    assert resumed[-1].event == "end"
    # resuming at the end gives only the end
    assert [e.event for e in client.events(job["id"], last_event_id=states[-1].id)] == ["end"]

    # the CLI follows the same stream
    watched = CliRunner(env={"NEXUSGEN_API_URL": server[0], "NEXUSGEN_API_KEY": client.api_key}).invoke(
        cli, ["status", "--watch", job["id"]]
    )
    assert watched.exit_code == 0, watched.output
    assert "denoising 3/3" in watched.output and watched.output.strip().endswith("ended: succeeded")


def test_a_batch_stream_shows_each_jobs_stages_and_ends_when_the_batch_completed(
    engine: Engine, worker: WorkerProcess, server: tuple[str, Any]
) -> None:
    client = http_client(engine, server[0], "sse-batch")
    params = {"width": 256, "height": 256, "steps": 2}
    jobs = [
        {"task": "generate", "prompt": f"a fox {i}", "params": params, "custom_id": f"c{i}"} for i in range(2)
    ]
    batch = client.create_batch(jobs)
    events = list(client.watch(batch["id"]))
    assert events[-1].event == "end" and events[-1].data == {"batch_id": batch["id"], "status": "completed"}
    by_job: dict[str, list[str]] = {}
    for e in events[:-1]:
        assert e.event == "state" and e.data["batch_id"] == batch["id"]
        stages = by_job.setdefault(e.data["job_id"], [])
        if not stages or stages[-1] != e.data["stage"]:
            stages.append(e.data["stage"])
    assert len(by_job) == 2 and all(stages == STAGES for stages in by_job.values()), by_job
    ids = [int(e.id) for e in events[:-1]]
    assert ids == sorted(set(ids))
    resumed = list(client.events(batch["id"], last_event_id=events[1].id))
    assert [e.id for e in resumed] == [e.id for e in events[2:]]
