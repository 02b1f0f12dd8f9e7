"""No network I/O inside a database transaction: webhook DNS checks and inline-image puts happen before the
idempotency transaction opens, and the objects of a request that creates nothing are deleted (real S3)."""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select

from core import idempotency
from core.schema import jobs, uploads
from core.ssrf import use_resolver
from tests.api.conftest import Tenant, png_bytes, upload

PUBLIC_IP = "93.184.216.34"


def inline(color: str = "red") -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(color=color)).decode()


def edit(color: str = "red", **extra: Any) -> dict[str, Any]:
    return {"task": "edit", "instruction": "make it blue", "image": inline(color), **extra}


def stored_uploads(app: Any, tenant: Tenant) -> list[str]:
    return list(app.extensions["nexusgen"].storage.list_keys(f"tenants/{tenant.id}/uploads/"))


def count(engine: Any, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


@pytest.fixture
def io_seen(app: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int]]]:
    """Each DNS lookup and object put of the app, with how many pooled connections were checked out then."""
    svc = app.extensions["nexusgen"]
    seen: list[tuple[str, int]] = []
    real_put = svc.storage.put_bytes

    def put(key: str, data: bytes, content_type: str) -> str:
        seen.append(("put", svc.engine.pool.checkedout()))
        return str(real_put(key, data, content_type))

    def resolve(host: str, port: int) -> list[str]:
        seen.append(("dns", svc.engine.pool.checkedout()))
        return [PUBLIC_IP]

    monkeypatch.setattr(svc.storage, "put_bytes", put)
    with use_resolver(resolve):
        yield seen


def test_dns_checks_and_puts_hold_no_database_connection(
    client: Any, app: Any, acme: Tenant, io_seen: list[tuple[str, int]]
) -> None:
    hook = {"url": "https://hooks.example.com/a"}
    r = client.post("/v1/jobs", json=edit(webhook=hook), headers={**acme.headers, "Idempotency-Key": "io-1"})
    assert r.status_code == 201, r.get_json()
    body = {
        "jobs": [edit("green"), edit("blue", webhook={"url": "https://hooks.example.com/b"})],
        "webhook": hook,
    }
    r = client.post("/v1/batches", json=body, headers={**acme.headers, "Idempotency-Key": "io-2"})
    assert r.status_code == 201, r.get_json()
    assert upload(client, acme, png_bytes(color="white"), **{"Idempotency-Key": "io-3"}).status_code == 201
    assert sorted({kind for kind, _ in io_seen}) == ["dns", "put"] and len(io_seen) >= 6
    assert [held for _, held in io_seen] == [0] * len(io_seen)


def test_a_refused_webhook_answers_as_before(app: Any, settings: Any, acme: Tenant, engine: Any) -> None:
    from api.app import create_app

    strict = create_app(settings.with_overrides(webhook_allow_private_networks=False)).test_client()
    with use_resolver(lambda host, port: ["10.0.0.7"]):
        r = strict.post("/v1/jobs", json=edit(webhook={"url": "https://in.example/x"}), headers=acme.headers)
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "webhook_url_refused"
    assert "private" in r.get_json()["error"]["message"] and count(engine, jobs) == 0


def test_a_stalled_webhook_lookup_answers_503_and_creates_nothing(
    app: Any, settings: Any, acme: Tenant, engine: Any
) -> None:
    """The resolver does not answer: infrastructure trouble, 503 with Retry-After and a code, within the
    bound (WEBHOOK_TIMEOUT_S here, shorter than 5 s); once it answers, the same request is accepted."""
    from api.app import create_app

    client = create_app(settings.with_overrides(webhook_timeout_s=0.5)).test_client()
    release = threading.Event()

    def stall(host: str, port: int) -> list[str]:
        release.wait(10)  # a resolver that never answers within the request
        return [PUBLIC_IP]

    hook = {"url": "https://stalled-dns.example/in"}
    line = b'{"task": "generate", "prompt": "a fox", "custom_id": "%d"}\n'
    requests: list[tuple[str, dict[str, Any]]] = [
        ("/v1/jobs", {"json": {"task": "generate", "prompt": "a fox", "webhook": hook}}),
        ("/v1/batches", {"json": {"jobs": [{"task": "generate", "prompt": "a fox"}] * 3, "webhook": hook}}),
        (
            f"/v1/batches?webhook_url={hook['url']}",
            {"data": b"".join(line % i for i in range(3)), "content_type": "application/x-ndjson"},
        ),
    ]
    try:
        with use_resolver(stall):
            for path, body in requests:
                started = time.monotonic()
                r = client.post(path, headers=acme.headers, **body)
                assert time.monotonic() - started < 3.0
                assert r.status_code == 503 and r.headers["Retry-After"].isdigit(), r.get_json()
                assert r.get_json()["error"]["code"] == "webhook_lookup_timeout"
    finally:
        release.set()
    assert count(engine, jobs) == 0

    def try_again(host: str, port: int) -> list[str]:  # what getaddrinfo raises when DNS is unreachable
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    def no_such_host(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with use_resolver(try_again):
        for path, body in requests:
            r = client.post(path, headers=acme.headers, **body)
            assert r.status_code == 503 and r.headers["Retry-After"].isdigit(), r.get_json()
            assert r.get_json()["error"]["code"] == "webhook_lookup_timeout"
    with use_resolver(no_such_host):
        for path, body in requests:
            r = client.post(path, headers=acme.headers, **body)
            assert r.status_code == 422 and "webhook_url_refused" in r.get_data(as_text=True), r.get_json()
    assert count(engine, jobs) == 0
    with use_resolver(lambda host, port: [PUBLIC_IP]):
        for path, body in requests:
            assert client.post(path, headers=acme.headers, **body).status_code == 201


def test_a_failed_request_leaves_no_object(client: Any, app: Any, acme: Tenant, engine: Any) -> None:
    """The image was put before the transaction; the transaction then refused the request (an upload id
    only the database can find missing): the object is deleted."""
    body = {"jobs": [edit(), {"task": "understand", "instruction": "what?", "image": "upl_missing"}]}
    r = client.post("/v1/batches", json=body, headers=acme.headers)
    assert (
        r.status_code == 422 and r.get_json()["error"]["details"]["errors"][0]["code"] == "upload_not_found"
    )
    assert stored_uploads(app, acme) == [] and count(engine, uploads) == 0


def test_a_replay_puts_nothing(client: Any, app: Any, acme: Tenant, io_seen: list[tuple[str, int]]) -> None:
    headers = {**acme.headers, "Idempotency-Key": "replay-1"}
    first = client.post("/v1/jobs", json=edit(), headers=headers)
    puts = len(io_seen)
    second = client.post("/v1/jobs", json=edit(), headers=headers)
    assert second.headers["Idempotent-Replayed"] == "true" and second.get_json() == first.get_json()
    assert len(io_seen) == puts and len(stored_uploads(app, acme)) == 1


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/batches", "/v1/uploads"])
def test_a_replay_found_in_the_transaction_deletes_its_objects(
    client: Any, app: Any, acme: Tenant, engine: Any, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests with one key, the second past the early lookup before the first committed: the second
    put its image, then found the first's answer in the transaction, replayed it and deleted the image."""
    headers = {**acme.headers, "Idempotency-Key": f"race-{path}"}

    def send() -> Any:
        if path == "/v1/uploads":
            return upload(client, acme, png_bytes(color="navy"), **headers)
        return client.post(path, json=edit() if path == "/v1/jobs" else {"jobs": [edit()]}, headers=headers)

    first = send()
    assert first.status_code == 201, first.get_json()
    kept = stored_uploads(app, acme)
    monkeypatch.setattr(idempotency, "lookup", lambda *args: None)  # the race: the lookup saw nothing
    second = send()
    assert second.headers["Idempotent-Replayed"] == "true" and second.get_json() == first.get_json()
    assert stored_uploads(app, acme) == kept and len(kept) == 1 and count(engine, uploads) == 1
