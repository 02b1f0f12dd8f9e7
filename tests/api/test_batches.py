"""POST /v1/batches (JSON and JSONL, all or nothing), counts, streamed results, cancel, isolation."""

from __future__ import annotations

import base64
import json
from typing import Any

from sqlalchemy import func, select

from core.schema import batches, job_counts, jobs, uploads
from tests.api.conftest import Tenant, png_bytes, upload

NDJSON = {"Content-Type": "application/x-ndjson"}


def _jsonl(lines: list[Any]) -> bytes:
    return "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines).encode() + b"\n"


def _count(engine: Any, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def test_json_batch_inherits_the_batch_webhook(client: Any, acme: Tenant, engine: Any) -> None:
    body = {
        "jobs": [
            {"task": "generate", "prompt": "a", "custom_id": "a"},
            {"task": "generate", "prompt": "b", "webhook": {"url": "http://127.0.0.1:9/own"}},
        ],
        "webhook": {"url": "http://127.0.0.1:9/batch", "events": ["batch.completed"]},
        "metadata": {"run": 1},
    }
    r = client.post("/v1/batches", json=body, headers=acme.headers)
    assert r.status_code == 201, r.get_json()
    batch = r.get_json()
    assert batch["total_jobs"] == 2 and batch["counts"]["queued"] == 2 and batch["metadata"] == {"run": 1}
    assert batch["webhook"] == {"url": "http://127.0.0.1:9/batch", "events": ["batch.completed"]}
    with engine.connect() as conn:
        urls = (
            conn.execute(select(jobs.c.webhook_url).where(jobs.c.batch_id == batch["id"]).order_by(jobs.c.id))
            .scalars()
            .all()
        )
    assert urls == ["http://127.0.0.1:9/batch", "http://127.0.0.1:9/own"]


def test_jsonl_batch_takes_webhook_and_metadata_as_query_parameters(
    client: Any, acme: Tenant, engine: Any
) -> None:
    body = _jsonl(
        [
            {"task": "generate", "prompt": "a", "custom_id": "a"},
            {
                "task": "generate",
                "prompt": "b",
                "custom_id": "b",
                "webhook": {"url": "http://127.0.0.1:9/own"},
            },
        ]
    )
    query = {
        "webhook_url": "http://127.0.0.1:9/batch?x=1&y=2",
        "webhook_events": "job.succeeded,batch.completed",
        "metadata": json.dumps({"run": "nightly", "n": 2}),
    }
    r = client.post("/v1/batches", data=body, headers={**acme.headers, **NDJSON}, query_string=query)
    assert r.status_code == 201, r.get_json()
    batch = r.get_json()
    assert batch["metadata"] == {"run": "nightly", "n": 2}
    events = ["batch.completed", "job.succeeded"]
    assert batch["webhook"] == {"url": "http://127.0.0.1:9/batch?x=1&y=2", "events": events}
    with engine.connect() as conn:
        rows = conn.execute(
            select(jobs.c.custom_id, jobs.c.webhook_url, jobs.c.webhook_events)
            .where(jobs.c.batch_id == batch["id"])
            .order_by(jobs.c.id)
        ).all()
    # a line without its own webhook inherits the batch's; a line with one keeps it
    assert [tuple(r) for r in rows] == [
        ("a", "http://127.0.0.1:9/batch?x=1&y=2", events),
        ("b", "http://127.0.0.1:9/own", None),
    ]
    # the same body with another webhook is another request: its Idempotency-Key cannot replay the first
    headers = {**acme.headers, **NDJSON, "Idempotency-Key": "q-1"}
    assert client.post("/v1/batches", data=body, headers=headers, query_string=query).status_code == 201
    replay = client.post("/v1/batches", data=body, headers=headers, query_string=query)
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    other = client.post(
        "/v1/batches", data=body, headers=headers, query_string={"webhook_url": "http://127.0.0.1:9/z"}
    )
    assert other.status_code == 422 and other.get_json()["error"]["code"] == "idempotency_conflict"


def test_bad_batch_query_parameters_are_refused_and_create_nothing(
    client: Any, acme: Tenant, engine: Any
) -> None:
    body = _jsonl([{"task": "generate", "prompt": "a", "custom_id": "a"}])
    cases = [
        ({"webhook_events": "job.succeeded"}, "invalid_webhook"),
        ({"webhook_url": "http://127.0.0.1:9/x", "webhook_events": "job.exploded"}, "invalid_webhook"),
        ({"webhook_url": "gopher://x"}, "webhook_url_refused"),
        ({"metadata": "{not json"}, "invalid_metadata"),
        ({"metadata": "[1, 2]"}, "invalid_metadata"),
        ({"metadata": "null"}, "invalid_metadata"),
    ]
    for query, code in cases:
        r = client.post("/v1/batches", data=body, headers={**acme.headers, **NDJSON}, query_string=query)
        assert (r.status_code, r.get_json()["error"]["code"]) == (422, code), (query, r.get_json())
    both = {"jobs": [{"task": "generate", "prompt": "a"}], "metadata": {"a": 1}}
    r = client.post("/v1/batches", json=both, headers=acme.headers, query_string={"metadata": "{}"})
    assert (r.status_code, r.get_json()["error"]["code"]) == (422, "invalid_metadata")
    assert _count(engine, batches) == 0 and _count(engine, jobs) == 0


def test_jsonl_batch_keeps_line_order(client: Any, acme: Tenant) -> None:
    upload_id = upload(client, acme).get_json()["id"]
    inline = "data:image/png;base64," + base64.b64encode(png_bytes(32, 32)).decode()
    lines = [
        {"task": "generate", "prompt": "一只猫", "params": {"language": "zh"}, "custom_id": "g"},
        {"task": "edit", "instruction": "blue", "image": upload_id, "custom_id": "e"},
        {
            "task": "edit",
            "instruction": "red",
            "image": inline,
            "params": {"decoder": "generation"},
            "custom_id": "e2",
        },
        "",
        {"task": "understand", "instruction": "what", "image": upload_id, "custom_id": "u"},
    ]
    r = client.post("/v1/batches", data=_jsonl(lines), headers={**acme.headers, **NDJSON})
    assert r.status_code == 201, r.get_json()
    batch_id = r.get_json()["id"]
    got = client.get(f"/v1/batches/{batch_id}", headers=acme.headers).get_json()
    assert got["total_jobs"] == 4 and got["counts"]["queued"] == 4 and got["status"] == "in_progress"
    listed = client.get(f"/v1/jobs?batch_id={batch_id}", headers=acme.headers).get_json()["data"]
    assert [j["custom_id"] for j in listed] == ["g", "e", "e2", "u"]
    stream = client.get(f"/v1/batches/{batch_id}/results", headers=acme.headers)
    assert stream.status_code == 200 and stream.mimetype == "application/x-ndjson"
    records = [json.loads(line) for line in stream.get_data(as_text=True).splitlines()]
    assert [r["custom_id"] for r in records] == ["g", "e", "e2", "u"]
    assert {r["status"] for r in records} == {"queued"} and all(r["result"] is None for r in records)
    assert [r["job_id"] for r in records] == [j["id"] for j in listed]


def test_invalid_jsonl_names_every_bad_line_and_creates_nothing(
    client: Any, acme: Tenant, engine: Any
) -> None:
    good = {"task": "generate", "prompt": "ok"}
    lines = [
        {**good, "custom_id": "1"},
        "{not json",
        {**good, "custom_id": "3", "params": {"width": 100}},
        {**good, "custom_id": "1"},
        {"task": "dance", "custom_id": "5"},
        {**good, "custom_id": "6"},
        good,
        {"task": "edit", "instruction": "x", "image": "upl_missing", "custom_id": "8"},
        {**good, "custom_id": "9", "params": {"steps": 500}},
    ]
    r = client.post("/v1/batches", data=_jsonl(lines), headers={**acme.headers, **NDJSON})
    assert r.status_code == 422
    error = r.get_json()["error"]
    assert error["code"] == "invalid_jsonl"
    got = [(e["line"], e["code"]) for e in error["details"]["errors"]]
    assert got == [
        (2, "invalid_json"),
        (3, "invalid_size"),
        (4, "duplicate_custom_id"),
        (5, "unknown_task"),
        (7, "missing_custom_id"),
        (8, "upload_not_found"),
        (9, "invalid_steps"),
    ]
    assert all(e["message"] for e in error["details"]["errors"])
    assert _count(engine, jobs) == 0 and _count(engine, batches) == 0


def test_bad_lines_after_thousands_of_copied_ones_create_nothing(
    client: Any, acme: Tenant, engine: Any
) -> None:
    # no line needs I/O to be checked, so lines are copied while the next are checked
    # (core.ingest.copy_validated): the first 3,000 are sent to Postgres before the bad ones are read
    good = [{"task": "generate", "prompt": f"p{i}", "custom_id": f"c{i}"} for i in range(3000)]
    lines = [*good, {"task": "generate", "prompt": "x", "custom_id": "c0"}, good[0] | {"custom_id": "z"}]
    lines += [{"task": "generate", "prompt": "y", "custom_id": "w", "params": {"width": 100}}]
    r = client.post("/v1/batches", data=_jsonl(lines), headers={**acme.headers, **NDJSON})
    assert r.status_code == 422, r.get_json()
    assert r.get_json()["error"]["message"] == "2 of 3003 jobs are invalid; nothing was created"
    got = [(e["line"], e["code"]) for e in r.get_json()["error"]["details"]["errors"]]
    assert got == [(3001, "duplicate_custom_id"), (3003, "invalid_size")]
    assert _count(engine, jobs) == 0 and _count(engine, batches) == 0 and _count(engine, job_counts) == 0
    r = client.post("/v1/batches", data=_jsonl(good), headers={**acme.headers, **NDJSON})
    assert r.status_code == 201 and r.get_json()["total_jobs"] == 3000
    assert _count(engine, jobs) == 3000


def test_invalid_json_batch_names_indexes(client: Any, acme: Tenant, engine: Any) -> None:
    inline = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    body = {"jobs": [{"task": "edit", "instruction": "x", "image": inline}, {"task": "generate"}]}
    r = client.post("/v1/batches", json=body, headers=acme.headers)
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "invalid_batch"
    assert r.get_json()["error"]["details"]["errors"] == [
        {"index": 1, "code": "missing_prompt", "message": "a generate job needs a non-empty string 'prompt'"}
    ]
    assert _count(engine, jobs) == 0 and _count(engine, uploads) == 0


def test_malformed_batches(client: Any, acme: Tenant) -> None:
    cases = [
        ({"json": {"jobs": []}}, 422, "empty_batch"),
        ({"json": {"jobs": "x"}}, 422, "invalid_batch"),
        ({"json": {"jobs": [], "extra": 1}}, 422, "invalid_batch"),
        ({"data": b"\n\n", "headers": NDJSON}, 422, "empty_batch"),
        ({"data": b"[1,", "headers": {"Content-Type": "application/json"}}, 400, "invalid_json"),
        ({"data": b"\xff\n", "headers": NDJSON}, 422, "invalid_jsonl"),
        (
            {"json": {"jobs": [{"task": "generate", "prompt": "x"}], "webhook": {"url": "gopher://x"}}},
            422,
            "webhook_url_refused",
        ),
    ]
    for kwargs, status, code in cases:
        headers = {**acme.headers, **kwargs.pop("headers", {})}
        r = client.post("/v1/batches", headers=headers, **kwargs)
        assert r.status_code == status and r.get_json()["error"]["code"] == code, (kwargs, r.get_json())


def test_too_many_jobs(app: Any, settings: Any, acme: Tenant) -> None:
    from api.app import create_app

    small = create_app(settings.with_overrides(max_batch_jobs=3)).test_client()
    body = _jsonl([{"task": "generate", "prompt": "x", "custom_id": str(i)} for i in range(4)])
    r = small.post("/v1/batches", data=body, headers={**acme.headers, **NDJSON})
    assert r.status_code == 413 and r.get_json()["error"]["code"] == "too_many_jobs"


def test_cancel_batch_and_counts(client: Any, acme: Tenant) -> None:
    body = {"jobs": [{"task": "generate", "prompt": str(i)} for i in range(3)]}
    batch_id = client.post("/v1/batches", json=body, headers=acme.headers).get_json()["id"]
    r = client.post(f"/v1/batches/{batch_id}/cancel", headers=acme.headers)
    assert r.status_code == 200, r.get_json()
    got = r.get_json()
    assert got["counts"]["canceled"] == 3 and got["counts"]["queued"] == 0
    assert got["status"] == "completed" and got["cancel_requested"] is True


def test_tenant_isolation_for_batches(client: Any, acme: Tenant, globex: Tenant) -> None:
    batch_id = client.post(
        "/v1/batches", json={"jobs": [{"task": "generate", "prompt": "x"}]}, headers=acme.headers
    ).get_json()["id"]
    for method, path in [
        ("get", f"/v1/batches/{batch_id}"),
        ("get", f"/v1/batches/{batch_id}/results"),
        ("post", f"/v1/batches/{batch_id}/cancel"),
        ("get", f"/v1/jobs?batch_id={batch_id}"),
    ]:
        r = getattr(client, method)(path, headers=globex.headers)
        assert r.status_code == 404 and r.get_json()["error"]["code"] == "not_found", path
    assert client.get(f"/v1/batches/{batch_id}", headers=acme.headers).get_json()["counts"]["queued"] == 1


def test_upload_of_another_tenant_is_not_found(client: Any, acme: Tenant, globex: Tenant) -> None:
    upload_id = upload(client, acme).get_json()["id"]
    job = {"task": "edit", "instruction": "x", "image": upload_id}
    r = client.post("/v1/jobs", json=job, headers=globex.headers)
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "upload_not_found"
    r = client.post("/v1/batches", json={"jobs": [job]}, headers=globex.headers)
    assert (
        r.status_code == 422 and r.get_json()["error"]["details"]["errors"][0]["code"] == "upload_not_found"
    )
    assert client.post("/v1/jobs", json=job, headers=acme.headers).status_code == 201


def test_jsonl_lines_keep_long_integers_exact(client: Any, acme: Tenant) -> None:
    """A JSONL line is parsed by orjson, which reads an integer past 64 bits as a float: such lines are
    read by the standard library, so metadata comes back as it was sent, JSON and JSONL alike."""
    metadata = {"big": 123456789012345678901234567890, "edges": [2**64, -(2**63) - 1, 2**63 - 1], "f": 0.1}
    line = {"task": "generate", "prompt": "a", "custom_id": "a", "metadata": metadata}
    r = client.post("/v1/batches", data=_jsonl([line]), headers={**acme.headers, **NDJSON})
    assert r.status_code == 201, r.get_json()
    listed = client.get(f"/v1/jobs?batch_id={r.get_json()['id']}", headers=acme.headers).get_json()["data"]
    assert [job["metadata"] for job in listed] == [metadata]
