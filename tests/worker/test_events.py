"""Live status streams over real HTTP: a job run by a real worker shows every stage in order and its
stream ends at the terminal state; a resumed stream repeats nothing; 200 idle streams hold no database
connection; `nexusgen status --watch` follows the stream."""

from __future__ import annotations

import select as selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, func, select

from core.auth import create_api_key, create_tenant
from core.schema import job_events
from core.settings import Settings
from nexusgen.cli import main as cli
from nexusgen.client import Client
from tests.worker.support import WorkerProcess, warm

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
    worker = start_worker(cfg, "events")
    warm(cfg, worker)
    return worker


@pytest.fixture
def server(cfg: Settings, engine: Engine, clean_db: Any) -> Iterator[tuple[str, Any]]:
    """The API on a loopback port (threaded, one thread per connection), and its app."""
    from werkzeug.serving import WSGIRequestHandler, make_server

    from api.app import create_app

    class Quiet(WSGIRequestHandler):
        def log_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    app = create_app(cfg)
    http = make_server("127.0.0.1", 0, app, threaded=True, request_handler=Quiet)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{http.server_port}", app
    http.shutdown()
    thread.join()


def _client(engine: Engine, url: str, name: str) -> Client:
    with engine.begin() as conn:
        create_tenant(conn, name)
        key = create_api_key(conn, name)
    return Client(url, key)


def test_a_stream_shows_every_stage_in_order_and_resumes_without_repeats(
    engine: Engine, worker: WorkerProcess, server: tuple[str, Any]
) -> None:
    client = _client(engine, server[0], "sse")
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
    client = _client(engine, server[0], "sse-batch")
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


def _open_stream(host: str, port: int, path: str, key: str) -> socket.socket:
    sock = socket.create_connection((host, port))
    head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
    sock.sendall((head + "Accept: text/event-stream\r\n\r\n").encode())
    return sock


def _read_until(socks: list[socket.socket], marker: bytes, timeout_s: float) -> dict[socket.socket, bytes]:
    got = {s: b"" for s in socks}
    deadline = time.monotonic() + timeout_s
    waiting = set(socks)
    while waiting and time.monotonic() < deadline:
        ready, _, _ = selectors.select(list(waiting), [], [], 0.5)
        for s in ready:
            chunk = s.recv(65536)
            got[s] += chunk
            if marker in got[s] or not chunk:
                waiting.discard(s)
    return got


def test_200_idle_streams_hold_no_database_connection(
    engine: Engine, cfg: Settings, server: tuple[str, Any]
) -> None:
    url, app = server
    client = _client(engine, url, "idle")
    ahead = [client.create_job({"task": "generate", "prompt": f"x{i}"}) for i in range(2)]
    job = client.create_job({"task": "generate", "prompt": "waiting"})  # no worker: stays queued
    host, port = url.removeprefix("http://").split(":")
    socks: list[socket.socket] = []
    try:
        for _ in range(20):  # clients arrive in waves of 10
            wave = [
                _open_stream(host, int(port), f"/v1/jobs/{job['id']}/events", client.api_key)
                for _ in range(10)
            ]
            socks += wave
            first = _read_until(wave, b"event: queue", 120)
            bad = [data[:300] for data in first.values() if b'"queue_position":3' not in data]
            assert not bad, bad[:3]
        time.sleep(1.0)  # all idle now
        pool = app.extensions["nexusgen"].engine.pool
        samples = []
        for _ in range(60):  # three seconds: idle streams hold nothing
            samples.append(pool.checkedout())
            time.sleep(0.05)
        assert max(samples) <= 4, (samples, pool.status())  # of 15: the hub and at most 3 stream reads
        started = time.monotonic()
        assert client.get_job(job["id"])["queue_position"] == 3  # the API still answers at once
        assert time.monotonic() - started < 2.0
        for other in ahead:
            client.cancel(other["id"])
        moved = _read_until(socks, b'"queue_position":1', 120)  # positions are recounted every few s
        assert all(b'"queue_position":1' in data for data in moved.values())
        client.cancel(job["id"])  # the hub wakes every stream; each ends
        ended = _read_until(socks, b"event: end", 120)
        assert all(b'"status":"canceled"' in data for data in ended.values())
    finally:
        for s in socks:
            s.close()


def test_streams_refuse_other_tenants_and_bad_ids(engine: Engine, server: tuple[str, Any]) -> None:
    owner = _client(engine, server[0], "owner")
    other = _client(engine, server[0], "other")
    job = owner.create_job({"task": "generate", "prompt": "mine"})
    response = other._http.get(f"/v1/jobs/{job['id']}/events")
    assert response.status_code == 404
    bad = owner._http.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "yesterday"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_last_event_id"
    owner.cancel(job["id"])
    assert [e.event for e in owner.watch(job["id"])][-1] == "end"
