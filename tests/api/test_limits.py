"""Tenant limits at submission: 429 with Retry-After and the RateLimit fields, and nothing created.

Limits are changed with the admin command (`nexusgen tenant set-limits`) and take effect at once.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from core.schema import batches, jobs
from nexusgen.cli import main as cli
from tests.api.conftest import Tenant

NDJSON = {"Content-Type": "application/x-ndjson"}
JOB = {"task": "generate", "prompt": "a cat", "params": {"steps": 2}}


@pytest.fixture
def set_limits(settings: Any) -> Any:
    runner = CliRunner(env={"DATABASE_URL": settings.database_url})

    def run(tenant: Tenant, *args: str) -> str:
        result = runner.invoke(cli, ["tenant", "set-limits", tenant.name, *args])
        assert result.exit_code == 0, result.output
        return result.output

    return run


def _jsonl(n: int, start: int = 0) -> bytes:
    return b"".join(
        json.dumps({**JOB, "custom_id": f"c{i}"}).encode() + b"\n" for i in range(start, start + n)
    )


def _count(engine: Any, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def test_submissions_over_the_rate_get_429_with_headers(
    client: Any, acme: Tenant, globex: Tenant, engine: Any, set_limits: Any
) -> None:
    output = set_limits(acme, "--submit-per-minute", "3", "--max-queued", "0")
    assert "submit_per_minute: 3\n" in output and "max_queued: 0\n" in output
    remaining = []
    for _ in range(3):
        r = client.post("/v1/jobs", json=JOB, headers=acme.headers)
        assert r.status_code == 201, r.get_json()
        assert r.headers["RateLimit-Policy"] == '"submit";q=3;w=60'
        remaining.append(r.headers["RateLimit"].split(";")[1])
    assert remaining == ["r=2", "r=1", "r=0"]

    over = client.post("/v1/jobs", json=JOB, headers={**acme.headers, "Idempotency-Key": "k-over"})
    assert over.status_code == 429
    error = over.get_json()["error"]
    assert error["code"] == "rate_limited" and error["details"]["submit_per_minute"] == 3
    retry = int(over.headers["Retry-After"])
    assert 1 <= retry <= 20  # one submission comes back every 60/3 s
    assert over.headers["RateLimit-Policy"] == '"submit";q=3;w=60'
    assert over.headers["RateLimit"] == f'"submit";r=0;t={retry}'
    batch = client.post("/v1/batches", data=_jsonl(2), headers={**acme.headers, **NDJSON})
    assert batch.status_code == 429 and batch.get_json()["error"]["code"] == "rate_limited"
    assert _count(engine, jobs) == 3 and _count(engine, batches) == 0  # nothing created
    # another tenant has its own budget (the default, 600 a minute)
    other = client.post("/v1/jobs", json=JOB, headers=globex.headers)
    assert other.status_code == 201 and other.headers["RateLimit-Policy"].startswith('"submit";q=600;w=60')

    # the admin raises the limit: it takes effect at once, and the refused key was not used up
    set_limits(acme, "--submit-per-minute", "100")
    again = client.post("/v1/jobs", json=JOB, headers={**acme.headers, "Idempotency-Key": "k-over"})
    assert again.status_code == 201 and "Idempotent-Replayed" not in again.headers
    replay = client.post("/v1/jobs", json=JOB, headers={**acme.headers, "Idempotency-Key": "k-over"})
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    set_limits(acme, "--submit-per-minute", "0")
    unlimited = client.post("/v1/jobs", json=JOB, headers=acme.headers)
    assert unlimited.status_code == 201 and "RateLimit-Policy" not in unlimited.headers


def test_a_batch_over_the_queued_limit_is_refused_whole(
    client: Any, acme: Tenant, engine: Any, set_limits: Any
) -> None:
    set_limits(acme, "--max-queued", "5", "--submit-per-minute", "0")
    first = client.post("/v1/batches", data=_jsonl(4), headers={**acme.headers, **NDJSON})
    assert first.status_code == 201
    assert (
        first.headers["RateLimit-Policy"] == '"queued";q=5' and first.headers["RateLimit"] == '"queued";r=1'
    )

    over = client.post("/v1/batches", data=_jsonl(3, 10), headers={**acme.headers, **NDJSON})
    assert over.status_code == 429
    error = over.get_json()["error"]
    assert error["code"] == "queue_limit"
    assert error["details"] == {"limit": "max_queued", "max_queued": 5, "queued": 4, "submitted": 3}
    assert int(over.headers["Retry-After"]) > 0 and over.headers["RateLimit"].startswith('"queued";r=1;t=')
    assert _count(engine, jobs) == 4 and _count(engine, batches) == 1  # the refused batch left nothing

    assert client.post("/v1/jobs", json=JOB, headers=acme.headers).headers["RateLimit"] == '"queued";r=0'
    full = client.post("/v1/jobs", json=JOB, headers=acme.headers)
    assert full.status_code == 429 and full.get_json()["error"]["details"]["queued"] == 5
    # canceled jobs leave the queue: there is room again
    assert (
        client.post(f"/v1/batches/{first.get_json()['id']}/cancel", headers=acme.headers).status_code == 200
    )
    assert (
        client.post("/v1/batches", data=_jsonl(3, 20), headers={**acme.headers, **NDJSON}).status_code == 201
    )
    # a bad line is named before the limit, as the whole batch is refused for either
    bad = _jsonl(2, 40) + json.dumps({**JOB, "params": {"steps": 0}, "custom_id": "bad"}).encode()
    r = client.post("/v1/batches", data=bad, headers={**acme.headers, **NDJSON})
    assert r.status_code == 422 and r.get_json()["error"]["details"]["errors"][0]["line"] == 3
    # the admin lifts the limit
    set_limits(acme, "--default", "max_queued")
    r = client.post("/v1/batches", data=_jsonl(5, 30), headers={**acme.headers, **NDJSON})
    assert r.status_code == 201 and r.headers["RateLimit-Policy"] == '"queued";q=1000000'
