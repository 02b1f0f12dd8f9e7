"""Live status streams without a worker: 200 idle streams hold no database connection and still get
their queue positions and their end; other tenants' streams are 404."""

from __future__ import annotations

import select as selectors
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine

from core.settings import Settings
from tests.support.api import http_client, serve


@pytest.fixture
def server(settings: Settings, engine: Engine, clean_db: Any) -> Iterator[tuple[str, Any]]:
    """The API on a loopback port (threaded, one thread per connection), and its app."""
    from api.app import create_app

    app = create_app(settings.with_overrides(max_event_streams=250))
    with serve(app) as url:
        yield url, app


def _open_stream(host: str, port: int, path: str, key: str) -> socket.socket:
    sock = socket.create_connection((host, port))
    head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
    sock.sendall((head + "Accept: text/event-stream\r\n\r\n").encode())
    return sock


def _read_until(socks: list[socket.socket], marker: bytes, timeout_s: float) -> dict[socket.socket, bytes]:
    got = dict.fromkeys(socks, b"")
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


def test_200_idle_streams_hold_no_database_connection(engine: Engine, server: tuple[str, Any]) -> None:
    url, app = server
    client = http_client(engine, url, "idle")
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
    owner = http_client(engine, server[0], "owner")
    other = http_client(engine, server[0], "other")
    job = owner.create_job({"task": "generate", "prompt": "mine"})
    response = other._http.get(f"/v1/jobs/{job['id']}/events")
    assert response.status_code == 404
    bad = owner._http.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "yesterday"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_last_event_id"
    owner.cancel(job["id"])
    assert [e.event for e in owner.watch(job["id"])][-1] == "end"
