"""Idempotency-Key: replay of the first answer, conflict on another body, one creation under concurrency."""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import func, select, text

from core import idempotency
from core.schema import idempotency_keys, jobs, uploads
from tests.api.conftest import Tenant, png_bytes, upload


def _jobs(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(jobs)).scalar_one())


def test_same_key_same_body_replays(client: Any, acme: Tenant, engine: Any) -> None:
    headers = {**acme.headers, "Idempotency-Key": "k-1"}
    first = client.post("/v1/jobs", json={"task": "generate", "prompt": "x"}, headers=headers)
    second = client.post("/v1/jobs", json={"task": "generate", "prompt": "x"}, headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.get_json() == second.get_json()  # the same job, the same seed
    assert second.headers["Idempotent-Replayed"] == "true"
    assert _jobs(engine) == 1


def test_same_key_other_body_conflicts(client: Any, acme: Tenant, engine: Any) -> None:
    headers = {**acme.headers, "Idempotency-Key": "k-2"}
    assert (
        client.post("/v1/jobs", json={"task": "generate", "prompt": "x"}, headers=headers).status_code == 201
    )
    r = client.post("/v1/jobs", json={"task": "generate", "prompt": "y"}, headers=headers)
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "idempotency_conflict"
    r = client.post("/v1/batches", json={"jobs": [{"task": "generate", "prompt": "x"}]}, headers=headers)
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "idempotency_conflict"
    assert _jobs(engine) == 1


def test_keys_are_per_tenant(client: Any, acme: Tenant, globex: Tenant, engine: Any) -> None:
    body = {"task": "generate", "prompt": "x"}
    a = client.post("/v1/jobs", json=body, headers={**acme.headers, "Idempotency-Key": "shared"})
    b = client.post("/v1/jobs", json=body, headers={**globex.headers, "Idempotency-Key": "shared"})
    assert a.status_code == b.status_code == 201 and a.get_json()["id"] != b.get_json()["id"]


def test_failed_request_does_not_keep_the_key(client: Any, acme: Tenant, engine: Any) -> None:
    headers = {**acme.headers, "Idempotency-Key": "k-3"}
    assert client.post("/v1/jobs", json={"task": "generate"}, headers=headers).status_code == 422
    assert (
        client.post("/v1/jobs", json={"task": "generate", "prompt": "x"}, headers=headers).status_code == 201
    )


def test_batches_and_uploads_replay(client: Any, acme: Tenant, engine: Any) -> None:
    body = {"jobs": [{"task": "generate", "prompt": str(i)} for i in range(3)]}
    headers = {**acme.headers, "Idempotency-Key": "batch-1"}
    first = client.post("/v1/batches", json=body, headers=headers).get_json()
    assert client.post("/v1/batches", json=body, headers=headers).get_json()["id"] == first["id"]
    assert _jobs(engine) == 3
    data = png_bytes()
    one = upload(client, acme, data, **{"Idempotency-Key": "up-1"}).get_json()
    two = upload(client, acme, data, **{"Idempotency-Key": "up-1"}).get_json()
    assert one == two
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(uploads)).scalar_one() == 1
    r = upload(client, acme, png_bytes(color="green"), **{"Idempotency-Key": "up-1"})
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "idempotency_conflict"


def test_expired_keys_are_ignored_and_purged(client: Any, acme: Tenant, engine: Any) -> None:
    headers = {**acme.headers, "Idempotency-Key": "old"}
    first = client.post("/v1/jobs", json={"task": "generate", "prompt": "x"}, headers=headers).get_json()
    with engine.begin() as conn:
        conn.execute(text("UPDATE idempotency_keys SET created_at = now() - interval '25 hours'"))
    second = client.post("/v1/jobs", json={"task": "generate", "prompt": "x"}, headers=headers).get_json()
    assert second["id"] != first["id"] and _jobs(engine) == 2
    with engine.begin() as conn:
        conn.execute(text("UPDATE idempotency_keys SET created_at = now() - interval '25 hours'"))
        assert idempotency.purge_expired(conn, 24 * 3600) == 1
        assert conn.execute(select(func.count()).select_from(idempotency_keys)).scalar_one() == 0


def test_invalid_key(client: Any, acme: Tenant) -> None:
    r = client.post(
        "/v1/jobs",
        json={"task": "generate", "prompt": "x"},
        headers={**acme.headers, "Idempotency-Key": "k" * 300},
    )
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_idempotency_key"


def test_concurrent_requests_with_one_key_create_once(app: Any, acme: Tenant, engine: Any) -> None:
    body = {"jobs": [{"task": "generate", "prompt": str(i)} for i in range(200)]}
    headers = {**acme.headers, "Idempotency-Key": "race"}
    answers: list[Any] = []
    barrier = threading.Barrier(6)

    def post() -> None:
        client = app.test_client()
        barrier.wait()
        r = client.post("/v1/batches", json=body, headers=headers)
        answers.append((r.status_code, r.get_json()["id"]))

    threads = [threading.Thread(target=post) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 6 and set(answers) == {(201, answers[0][1])}
    assert _jobs(engine) == 200
