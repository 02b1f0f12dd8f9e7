"""The typed records: enums keep their strings in SQL and JSON; every rendering selects from one payload."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import Engine, select

from core.ids import new_id
from core.records import (
    JOB_API_FIELDS,
    JOB_EVENT_FIELDS,
    JOB_RESULT_LINE_FIELDS,
    RESULT_EVENT_IMAGE,
    RESULT_EVENT_TEXT,
    Job,
    JobResult,
    JobStatus,
    ResultKind,
    Task,
    job_event_data,
    job_payload,
    result_payload,
)
from core.schema import jobs, tenants
from core.settings import Settings
from core.storage import Storage
from core.submit import SubmitError, validate_job


def test_enums_travel_as_their_strings_through_postgres_and_json(clean_db: Engine) -> None:
    tenant_id, job_id = new_id("ten"), new_id("job")
    with clean_db.begin() as conn:
        conn.execute(tenants.insert().values(id=tenant_id, name=tenant_id, webhook_secret="whsec_x"))
        conn.execute(
            jobs.insert().values(
                id=job_id,
                tenant_id=tenant_id,
                task=Task.EDIT,
                prompt="p",
                params={},
                bucket="b",
                status=JobStatus.FAILED,
                error_code="bad",
                error_message="m",
            )
        )
        stored = conn.execute(select(jobs.c.task, jobs.c.status).where(jobs.c.id == job_id)).one()
        assert tuple(stored) == ("edit", "failed")  # the value, not the member name
        count = conn.execute(select(jobs.c.id).where(jobs.c.status == JobStatus.FAILED)).scalars().all()
        assert count == [job_id]
        job = Job.from_row(conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().one())
    assert job.status is JobStatus.FAILED and job.task is Task.EDIT and job.status.terminal
    body = json.loads(json.dumps(job_payload(job)))
    assert list(body) == list(JOB_API_FIELDS)
    assert (body["status"], body["task"], body["result"]) == ("failed", "edit", None)
    assert body["error"] == {"code": "bad", "message": "m"}
    assert job_event_data(job) == {
        **{name: body[name] for name in JOB_EVENT_FIELDS if name != "links"},
        "links": {"self": f"/v1/jobs/{job_id}"},
        "error": {"code": "bad", "message": "m"},
    }
    line = job_payload(job, JOB_RESULT_LINE_FIELDS)
    assert line == {
        "custom_id": None,
        "job_id": job_id,
        "task": "edit",
        "status": "failed",
        "result": None,
        "error": {"code": "bad", "message": "m"},
    }


def test_result_renderings_differ_only_in_the_fields_they_select(settings: Settings) -> None:
    storage = Storage.from_settings(settings)
    image = JobResult("job_1", ResultKind.IMAGE, "k/1.png", "image/png", 10, "ab", 512, 256, None)
    api = result_payload(image, storage, 60)
    assert list(api) == ["content_type", "sha256", "url", "expires_at", "width", "height"]
    assert "/k/1.png?" in api["url"] and "X-Amz-Expires=60" in api["url"]
    event = result_payload(image, storage, 60, fields=(RESULT_EVENT_TEXT, RESULT_EVENT_IMAGE))
    assert list(event) == ["kind", "content_type", "width", "height", "sha256", "url", "expires_at"]
    unsigned = result_payload(image, None, 60)
    assert "url" not in unsigned and "expires_at" not in unsigned
    text = JobResult("job_2", ResultKind.TEXT, None, "text/plain", 2, "cd", None, None, "hi")
    assert result_payload(text, storage, 60) == {"content_type": "text/plain", "sha256": "cd", "text": "hi"}


def test_refusals_name_the_plain_strings(settings: Settings) -> None:
    with pytest.raises(SubmitError, match=r"one of \['generate', 'edit', 'understand'\], got 'paint'"):
        validate_job({"task": "paint", "prompt": "x"}, settings)
    with pytest.raises(SubmitError, match=r"list of \['job.succeeded', 'job.failed', "):
        validate_job(
            {"task": "generate", "prompt": "x", "webhook": {"url": "http://h/x", "events": []}}, settings
        )
