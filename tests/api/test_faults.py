"""No 500 for any input or outage: nested JSON, a removed tenant, wrong content types, a database down."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import delete

from core.schema import tenants
from tests.api.conftest import Tenant

DEEP = 50_000  # far past any recursion limit
SHALLOW_BUT_DEEP = 200  # parses, but deeper than metadata may nest


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [DEEP, 900])
def test_deeply_nested_json_is_a_4xx(client: Any, acme: Tenant, depth: int) -> None:
    job = '{"task": "generate", "prompt": "a fox", "metadata": {"x": ' + nested(depth) + "}}"
    headers = {**acme.headers, "Content-Type": "application/json"}
    r = client.post("/v1/jobs", data=job, headers=headers)
    assert 400 <= r.status_code < 500, (r.status_code, r.get_data()[:200])
    assert r.get_json()["error"]["code"] in ("invalid_json", "invalid_metadata")

    r = client.post("/v1/batches", data='{"jobs": [' + job + "]}", headers=headers)
    assert 400 <= r.status_code < 500 and r.get_json()["error"]["code"] in ("invalid_json", "invalid_batch")

    good = json.dumps({"custom_id": "a", "task": "generate", "prompt": "a fox"})
    bad = (
        '{"custom_id": "b", "task": "generate", "prompt": "a fox", "metadata": {"x": ' + nested(depth) + "}}"
    )
    jsonl = {**acme.headers, "Content-Type": "application/x-ndjson"}
    r = client.post("/v1/batches", data=f"{good}\n{bad}\n", headers=jsonl)
    assert r.status_code == 422, r.get_data()[:200]
    (error,) = r.get_json()["error"]["details"]["errors"]
    assert error["line"] == 2 and error["code"] in ("invalid_json", "invalid_metadata")


def test_metadata_nested_deeper_than_allowed_is_refused(client: Any, acme: Tenant) -> None:
    deep: Any = "leaf"
    for _ in range(SHALLOW_BUT_DEEP):
        deep = {"k": deep}
    r = client.post(
        "/v1/jobs", json={"task": "generate", "prompt": "a fox", "metadata": deep}, headers=acme.headers
    )
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "invalid_metadata"
    ok: Any = "leaf"
    for _ in range(8):
        ok = {"k": ok}
    r = client.post(
        "/v1/jobs", json={"task": "generate", "prompt": "a fox", "metadata": ok}, headers=acme.headers
    )
    assert r.status_code == 201 and r.get_json()["metadata"] == ok


def test_a_removed_tenant_gets_401_not_500(client: Any, acme: Tenant, engine: Any) -> None:
    body = {"task": "generate", "prompt": "a fox"}
    assert client.post("/v1/jobs", json=body, headers=acme.headers).status_code == 201  # key now cached
    with engine.begin() as conn:
        conn.execute(delete(tenants).where(tenants.c.id == acme.id))
    r = client.post("/v1/jobs", json=body, headers=acme.headers)
    assert r.status_code == 401 and r.get_json()["error"]["code"] == "unauthorized"
    assert client.post("/v1/jobs", json=body, headers=acme.headers).status_code == 401


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "image/png"])
def test_json_endpoints_refuse_other_content_types(client: Any, acme: Tenant, content_type: str) -> None:
    body = json.dumps({"task": "generate", "prompt": "a fox"})
    for path in ("/v1/jobs", "/v1/batches"):
        r = client.post(path, data=body, headers={**acme.headers, "Content-Type": content_type})
        assert r.status_code == 415, (path, r.status_code)
        assert r.get_json()["error"]["code"] == "unsupported_media_type"
    r = client.post("/v1/jobs", data=body, headers={**acme.headers, "Content-Type": "application/json"})
    assert r.status_code == 201


def test_database_down_is_503_with_retry_after(settings: Any, engine: Any, clean_db: Any) -> None:
    from api.app import create_app

    client = create_app(
        settings.with_overrides(database_url="postgresql://u:p@127.0.0.1:1/none")
    ).test_client()
    for method, path in (("get", "/v1/jobs/job_x"), ("post", "/v1/jobs"), ("get", "/v1/jobs")):
        r = getattr(client, method)(
            path, json={"task": "generate", "prompt": "x"}, headers={"Authorization": "Bearer k"}
        )
        assert r.status_code == 503, (path, r.status_code, r.get_data()[:300])
        assert r.get_json()["error"]["code"] == "database_unavailable"
        assert int(r.headers["Retry-After"]) > 0


def test_reads_beyond_the_pool_wait_then_answer_503_database_busy(
    settings: Any, clean_db: Any, make_tenant: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import api.app
    from api.app import create_app

    monkeypatch.setattr(api.app, "READ_POOL_TIMEOUT_S", 0.3)
    tenant = make_tenant("acme")
    app = create_app(settings)
    reader = app.extensions["nexusgen"].reader
    held = [reader.connect() for _ in range(api.app.READ_POOL)]  # every connection of the read pool
    try:
        r = app.test_client().get("/v1/jobs/job_x", headers=tenant.headers)
        assert r.status_code == 503, (r.status_code, r.get_data()[:300])
        assert r.get_json()["error"]["code"] == "database_busy"
        assert int(r.headers["Retry-After"]) > 0
    finally:
        for conn in held:
            conn.close()
    assert app.test_client().get("/v1/jobs/job_x", headers=tenant.headers).status_code == 404


def test_storage_down_is_503_with_retry_after(
    settings: Any, engine: Any, clean_db: Any, make_tenant: Any
) -> None:
    from api.app import create_app
    from tests.api.conftest import png_bytes

    tenant = make_tenant("acme")
    down = settings.with_overrides(s3_endpoint_url="http://127.0.0.1:1")
    client = create_app(down).test_client()
    import base64

    image = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    r = client.post(
        "/v1/jobs",
        json={"task": "understand", "instruction": "what is it?", "image": image},
        headers=tenant.headers,
    )
    assert r.status_code == 503, (r.status_code, r.get_data()[:300])
    assert r.get_json()["error"]["code"] == "storage_unavailable" and int(r.headers["Retry-After"]) > 0


def test_a_deeply_nested_cursor_is_a_400(client: Any, acme: Tenant) -> None:
    import base64

    cursor = base64.urlsafe_b64encode(nested(1500).encode()).decode()
    r = client.get("/v1/jobs", query_string={"cursor": cursor}, headers=acme.headers)
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_cursor"


def test_reads_answer_503_then_recover_when_the_database_restarts(
    settings: Any, engine: Any, clean_db: Any, make_tenant: Any
) -> None:
    """GETs use an autocommit pool without a pre-ping: a connection broken by a restart is a 503 once."""
    from sqlalchemy import text

    from api.app import create_app

    tenant = make_tenant("acme")
    app = create_app(settings)
    client = app.test_client()
    job = client.post("/v1/jobs", json={"task": "generate", "prompt": "a fox"}, headers=tenant.headers)
    path = f"/v1/jobs/{job.get_json()['id']}"
    assert client.get(path, headers=tenant.headers).status_code == 200
    with engine.begin() as conn:  # what a database restart does to the API's pooled connections
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND datname = current_database()"
            )
        )
    codes = [client.get(path, headers=tenant.headers).status_code for _ in range(3)]
    assert set(codes) <= {200, 503} and codes[-1] == 200, codes
