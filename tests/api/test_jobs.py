"""POST/GET /v1/jobs, listing with a cursor, cancel and results, through create_app's test client."""

from __future__ import annotations

import hashlib
from typing import Any

import httpx
import pytest

from core.jobs import claim_batch, complete_job, fail_job
from core.storage import Storage, result_key
from tests.api.conftest import Tenant, png_bytes, upload


def _claim_and_finish(
    engine: Any, storage: Storage, job: dict[str, Any], *, text: str | None = None
) -> bytes:
    """Run the worker's side of the state machine for one job; return the stored image bytes."""
    with engine.begin() as conn:
        (row,) = claim_batch(conn, worker_id="t", tasks=[job["task"]], max_batch=1, lease_s=60, bucket=None)
        assert row.id == job["id"]
        data = b""
        if text is not None:
            result = {"kind": "text", "text": text, "content_type": "text/plain", "sha256": None}
        else:
            data = png_bytes(256, 256)
            key = result_key(row.tenant_id, row.id, "png")
            digest = storage.put_bytes(key, data, "image/png")
            result = {
                "kind": "image",
                "object_key": key,
                "content_type": "image/png",
                "size_bytes": len(data),
                "sha256": digest,
                "width": 256,
                "height": 256,
            }
        assert complete_job(conn, row.id, row.attempt, provenance={"seed": 1}, result=result)
    return data


def test_generate_job_gets_defaults_and_a_recorded_seed(client: Any, acme: Tenant) -> None:
    r = client.post("/v1/jobs", json={"task": "generate", "prompt": "a red fox"}, headers=acme.headers)
    assert r.status_code == 201, r.get_json()
    job = r.get_json()
    assert job["status"] == "queued" and job["object"] == "job" and job["id"].startswith("job_")
    params = job["params"]
    assert (params["width"], params["height"], params["steps"]) == (512, 512, 50)
    assert (params["cfg_scale"], params["guidance"]) == (3.0, 3.5)
    assert isinstance(params["seed"], int)
    assert job["progress"] == {"step": None, "total_steps": None, "fraction": 0.0}
    assert job["error"] is None and job["result"] is None
    assert (job["worker_losses"], job["put_backs"]) == (0, 0)
    again = client.get(f"/v1/jobs/{job['id']}", headers=acme.headers)
    assert again.status_code == 200 and again.get_json()["params"]["seed"] == params["seed"]


def test_metadata_and_text_come_back_exactly_as_sent(client: Any, acme: Tenant) -> None:
    """Values that the fast JSON paths (orjson, reading jsonb and writing answers) would get wrong or refuse
    come back unchanged: integers beyond 64 bits, non-ASCII text, deep lists, floats at the edges."""
    metadata = {
        "big": 123456789012345678901234567890,
        "negative_big": -(2**70),
        "edge": [2**63 - 1, -(2**63), 2**64],
        "name": "café \u2603 \U0001f600",
        "floats": [0.1, 1e-300, -2.5e-7],
        "deep": [[[[{"k": "v"}]]]],
    }
    r = client.post(
        "/v1/jobs",
        json={"task": "generate", "prompt": "ein Fuchs, ½", "metadata": metadata},
        headers=acme.headers,
    )
    assert r.status_code == 201, r.get_json()
    assert r.get_json()["metadata"] == metadata
    again = client.get(f"/v1/jobs/{r.get_json()['id']}", headers=acme.headers).get_json()
    assert again["metadata"] == metadata
    listed = client.get("/v1/jobs", headers=acme.headers).get_json()["data"]
    assert [job["metadata"] for job in listed if job["id"] == again["id"]] == [metadata]


def test_edit_job_defaults_and_bucket(client: Any, acme: Tenant, engine: Any) -> None:
    upload_id = upload(client, acme).get_json()["id"]
    r = client.post(
        "/v1/jobs",
        json={"task": "edit", "instruction": "make it blue", "image": upload_id, "params": {"seed": 7}},
        headers=acme.headers,
    )
    assert r.status_code == 201, r.get_json()
    assert r.get_json()["params"]["cfg_scale"] == 1.0 and r.get_json()["params"]["decoder"] == "edit"
    from sqlalchemy import select

    from core.schema import jobs

    with engine.connect() as conn:
        bucket = conn.execute(select(jobs.c.bucket).where(jobs.c.id == r.get_json()["id"])).scalar_one()
    assert bucket == "edit|edit|512x512|50|1|3.5"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"task": "paint", "prompt": "x"}, 422, "unknown_task"),
        ({"task": "generate"}, 422, "missing_prompt"),
        ({"task": "generate", "prompt": "   "}, 422, "missing_prompt"),
        ({"task": "edit", "prompt": "x", "image": "upl_x"}, 422, "missing_prompt"),
        ({"task": "generate", "prompt": "x" * 5000}, 422, "prompt_too_long"),
        ({"task": "generate", "prompt": "x", "params": {"width": 500}}, 422, "invalid_size"),
        ({"task": "generate", "prompt": "x", "params": {"height": 4096}}, 422, "invalid_size"),
        ({"task": "generate", "prompt": "x", "params": {"width": 128}}, 422, "invalid_size"),
        ({"task": "generate", "prompt": "x", "params": {"steps": 0}}, 422, "invalid_steps"),
        ({"task": "generate", "prompt": "x", "params": {"steps": 101}}, 422, "invalid_steps"),
        ({"task": "generate", "prompt": "x", "params": {"steps": True}}, 422, "invalid_steps"),
        ({"task": "generate", "prompt": "x", "params": {"colour": 1}}, 422, "invalid_params"),
        ({"task": "generate", "prompt": "x", "params": {"seed": -1}}, 422, "invalid_params"),
        ({"task": "generate", "prompt": "x", "priority": 1000}, 422, "invalid_priority"),
        ({"task": "generate", "prompt": "x", "metadata": {"a": "b" * 20000}}, 422, "metadata_too_large"),
        ({"task": "generate", "prompt": "x", "metadata": [1]}, 422, "invalid_metadata"),
        ({"task": "edit", "instruction": "x"}, 422, "invalid_image"),
        ({"task": "edit", "instruction": "x", "image": "http://example.com/a.png"}, 422, "invalid_image"),
        ({"task": "edit", "instruction": "x", "image": "data:image/png;base64,!!!"}, 422, "invalid_image"),
        ({"task": "edit", "instruction": "x", "image": "upl_doesnotexist"}, 422, "upload_not_found"),
        ({"task": "generate", "prompt": "x", "webhook": {"url": "ftp://h/x"}}, 422, "webhook_url_refused"),
        (
            {"task": "generate", "prompt": "x", "webhook": {"url": "http://h/x", "events": ["x"]}},
            422,
            "invalid_webhook",
        ),
        ({"task": "generate", "prompt": "x", "surprise": 1}, 422, "invalid_job"),
        ([1, 2], 422, "invalid_job"),
    ],
)
def test_invalid_jobs_get_machine_readable_codes(
    client: Any, acme: Tenant, body: Any, status: int, code: str
) -> None:
    r = client.post("/v1/jobs", json=body, headers=acme.headers)
    assert r.status_code == status, r.get_json()
    error = r.get_json()["error"]
    assert error["code"] == code and error["message"]
    assert client.get("/v1/jobs", headers=acme.headers).get_json()["data"] == []


def test_private_webhook_refused_unless_allowed(app: Any, settings: Any, acme: Tenant) -> None:
    from api.app import create_app

    strict = create_app(settings.with_overrides(webhook_allow_private_networks=False)).test_client()
    body = {"task": "generate", "prompt": "x", "webhook": {"url": "http://127.0.0.1:9/hook"}}
    r = strict.post("/v1/jobs", json=body, headers=acme.headers)
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "webhook_url_refused"
    assert app.test_client().post("/v1/jobs", json=body, headers=acme.headers).status_code == 201


def test_data_url_image_becomes_an_upload(client: Any, acme: Tenant, settings: Any) -> None:
    import base64

    data = png_bytes(80, 60)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    r = client.post(
        "/v1/jobs", json={"task": "understand", "instruction": "what?", "image": url}, headers=acme.headers
    )
    assert r.status_code == 201, r.get_json()
    assert r.get_json()["params"] == {"max_new_tokens": 1024}
    storage = Storage.from_settings(settings)
    keys = storage.list_keys(f"tenants/{acme.id}/uploads/")
    assert len(keys) == 1 and storage.get_bytes(keys[0]) == data


def test_bad_bodies_are_4xx(client: Any, acme: Tenant) -> None:
    r = client.post("/v1/jobs", data=b"{nope", headers={**acme.headers, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_json"
    r = client.post("/v1/jobs", data=b"\xff\xfe", headers=acme.headers)
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_json"


def test_list_with_cursor_and_filters(client: Any, acme: Tenant) -> None:
    ids = [
        client.post(
            "/v1/jobs", json={"task": "generate", "prompt": f"p{i}"}, headers=acme.headers
        ).get_json()["id"]
        for i in range(5)
    ]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=acme.headers)
    seen: list[str] = []
    cursor = None
    while True:
        query = "limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(f"/v1/jobs?{query}", headers=acme.headers).get_json()
        assert len(page["data"]) <= 2
        seen += [j["id"] for j in page["data"]]
        cursor = page["next_cursor"]
        if not page["has_more"]:
            assert cursor is None
            break
    assert seen == ids
    canceled = client.get("/v1/jobs?status=canceled", headers=acme.headers).get_json()["data"]
    assert [j["id"] for j in canceled] == [ids[0]]
    bad = client.get("/v1/jobs?cursor=zzz", headers=acme.headers)
    assert bad.status_code == 400 and bad.get_json()["error"]["code"] == "invalid_cursor"
    for query in ("limit=0", "limit=5000", "status=sleeping", "limit=abc"):
        r = client.get(f"/v1/jobs?{query}", headers=acme.headers)
        assert r.status_code == 422 and r.get_json()["error"]["code"] == "validation_error", query


def test_cancel_queued_job(client: Any, acme: Tenant) -> None:
    job = client.post("/v1/jobs", json={"task": "generate", "prompt": "x"}, headers=acme.headers).get_json()
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=acme.headers)
    assert r.status_code == 200 and r.get_json()["status"] == "canceled"
    r = client.get(f"/v1/jobs/{job['id']}/result", headers=acme.headers)
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "no_result"


def test_image_result_redirects_to_a_presigned_url(
    client: Any, acme: Tenant, engine: Any, settings: Any
) -> None:
    job = client.post("/v1/jobs", json={"task": "generate", "prompt": "x"}, headers=acme.headers).get_json()
    r = client.get(f"/v1/jobs/{job['id']}/result", headers=acme.headers)
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "not_ready"
    data = _claim_and_finish(engine, Storage.from_settings(settings), job)
    r = client.get(f"/v1/jobs/{job['id']}/result", headers=acme.headers)
    assert r.status_code == 302
    fetched = httpx.get(r.headers["Location"], timeout=10)
    assert fetched.status_code == 200 and fetched.content == data
    body = client.get(f"/v1/jobs/{job['id']}", headers=acme.headers).get_json()
    assert body["status"] == "succeeded" and body["provenance"] == {"seed": 1}
    result = body["result"]
    assert result["sha256"] == hashlib.sha256(data).hexdigest() and (result["width"], result["height"]) == (
        256,
        256,
    )
    assert result["url"].startswith(settings.s3_endpoint_url) and result["expires_at"]
    # finished jobs keep their result when canceled afterwards
    assert (
        client.post(f"/v1/jobs/{job['id']}/cancel", headers=acme.headers).get_json()["status"] == "succeeded"
    )


def test_text_result_is_plain_text(client: Any, acme: Tenant, engine: Any, settings: Any) -> None:
    upload_id = upload(client, acme).get_json()["id"]
    job = client.post(
        "/v1/jobs",
        json={"task": "understand", "instruction": "describe", "image": upload_id},
        headers=acme.headers,
    ).get_json()
    _claim_and_finish(engine, Storage.from_settings(settings), job, text="一只红色的狐狸")
    r = client.get(f"/v1/jobs/{job['id']}/result", headers=acme.headers)
    assert (
        r.status_code == 200 and r.mimetype == "text/plain" and r.get_data(as_text=True) == "一只红色的狐狸"
    )
    assert (
        client.get(f"/v1/jobs/{job['id']}", headers=acme.headers).get_json()["result"]["text"]
        == "一只红色的狐狸"
    )


def test_failed_job_shows_its_error(client: Any, acme: Tenant, engine: Any) -> None:
    job = client.post("/v1/jobs", json={"task": "generate", "prompt": "x"}, headers=acme.headers).get_json()
    with engine.begin() as conn:
        assert fail_job(conn, job["id"], None, code="no_image_token", message="no BOI")
    body = client.get(f"/v1/jobs/{job['id']}", headers=acme.headers).get_json()
    assert body["status"] == "failed" and body["error"] == {"code": "no_image_token", "message": "no BOI"}


def test_tenant_isolation_for_jobs(client: Any, acme: Tenant, globex: Tenant) -> None:
    job = client.post("/v1/jobs", json={"task": "generate", "prompt": "x"}, headers=acme.headers).get_json()
    for method, path in [
        ("get", f"/v1/jobs/{job['id']}"),
        ("post", f"/v1/jobs/{job['id']}/cancel"),
        ("get", f"/v1/jobs/{job['id']}/result"),
    ]:
        r = getattr(client, method)(path, headers=globex.headers)
        assert r.status_code == 404 and r.get_json()["error"]["code"] == "not_found", path
    assert client.get("/v1/jobs", headers=globex.headers).get_json()["data"] == []
    assert client.get(f"/v1/jobs/{job['id']}", headers=acme.headers).get_json()["status"] == "queued"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"task": "generate", "prompt": "a\u0000b"}, "invalid_prompt"),
        ({"task": "generate", "prompt": "a\ud800b"}, "invalid_prompt"),
        ({"task": "generate", "prompt": "x", "custom_id": "\u0000"}, "invalid_custom_id"),
        ({"task": "generate", "prompt": "x", "metadata": {"k": "\u0000"}}, "invalid_metadata"),
        ({"task": "generate", "prompt": "x", "metadata": {"k": float("nan")}}, "invalid_metadata"),
        ({"task": "generate", "prompt": "x", "params": {"negative_prompt": "\u0000"}}, "invalid_params"),
        (
            {"task": "generate", "prompt": "x", "webhook": {"url": "http://127.0.0.1/\u0000"}},
            "webhook_url_refused",
        ),
    ],
)
def test_text_postgres_cannot_store_is_refused(client: Any, acme: Tenant, body: Any, code: str) -> None:
    import json

    raw = json.dumps(body)  # NaN and lone surrogates go out as JSON allows them
    r = client.post("/v1/jobs", data=raw, headers={**acme.headers, "Content-Type": "application/json"})
    assert r.status_code == 422 and r.get_json()["error"]["code"] == code, r.get_json()


@pytest.mark.parametrize("job_id", ["%00", "job_" + "a" * 100, "job%20x", "a.b"])
def test_impossible_ids_are_not_found(client: Any, acme: Tenant, job_id: str) -> None:
    for method, path in [
        ("get", f"/v1/jobs/{job_id}"),
        ("post", f"/v1/jobs/{job_id}/cancel"),
        ("get", f"/v1/jobs/{job_id}/result"),
        ("get", f"/v1/batches/{job_id}"),
        ("get", f"/v1/batches/{job_id}/results"),
        ("post", f"/v1/batches/{job_id}/cancel"),
        ("get", f"/v1/jobs?batch_id={job_id}"),
    ]:
        r = getattr(client, method)(path, headers=acme.headers)
        assert r.status_code == 404 and r.get_json()["error"]["code"] == "not_found", (path, r.get_json())
