"""Jobs: create one, read one, list with a cursor, cancel, and fetch the result."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from apiflask import APIBlueprint
from flask import Response, jsonify, redirect, request
from sqlalchemy import Connection, RowMapping, Table, select, tuple_
from werkzeug.wrappers import Response as BaseResponse

from api.auth import auth, current_principal
from api.context import services
from api.errors import fail
from api.idempotency import Created, create_idempotently
from api.schemas import JobIn, JobListOut, JobListQuery, JobOut, describes_body
from core.ingest import job_row
from core.job_view import read_job_view
from core.jobs import cancel_job
from core.limits import admit
from core.pending_uploads import (
    delete_pending_uploads,
    insert_pending_uploads,
    missing_uploads,
    put_pending_uploads,
)
from core.records import (
    JOB_API_FIELDS,
    RESULT_API_IMAGE,
    RESULT_API_TEXT,
    Job,
    JobResult,
    JobStatus,
    ResultKind,
    job_payload,
    result_payload,
)
from core.schema import batches, jobs, results
from core.submit import JobDraft, SubmitError, parse_json, validate_job

bp = APIBlueprint("jobs", __name__, tag="Jobs")

# Ids are `prefix_` + hex (core.ids); anything else cannot exist and never reaches the database.
_ID = re.compile(r"[A-Za-z0-9_-]{1,40}")


def require_id(value: str, kind: str) -> str:
    """`value` if it could be an id, else a 404 (a NUL byte or a 1,000-character id is simply not found)."""
    if not _ID.fullmatch(value):
        fail(404, "not_found", f"no {kind} {value[:60]!r}")
    return value


def require_content_type(*extra: str) -> None:
    """415 unless the body is declared JSON (`application/json`, `...+json`) or one of `extra`."""
    mimetype = request.mimetype
    if not mimetype or mimetype == "application/json" or mimetype.endswith("+json") or mimetype in extra:
        return
    accepted = ", ".join(("application/json", *extra))
    fail(415, "unsupported_media_type", f"send the body as {accepted}, not {mimetype}")


def parse_json_body() -> Any:
    """The request body as JSON, or a 400 `invalid_json` answer."""
    try:
        return parse_json(request.get_data(cache=True))
    except (UnicodeDecodeError, ValueError) as exc:
        fail(400, "invalid_json", f"the body is not valid JSON: {exc}")


def results_by_job(conn: Connection, batch: Sequence[Job]) -> dict[str, JobResult]:
    """The results of the succeeded jobs among `batch`, in one query."""
    done = [job.id for job in batch if job.status is JobStatus.SUCCEEDED]
    if not done:
        return {}
    found = conn.execute(select(results).where(results.c.job_id.in_(done))).mappings().all()
    return {row["job_id"]: JobResult.from_row(row) for row in found}


def render_result(result: JobResult | None) -> dict[str, Any] | None:
    """The API's rendering of a result: a presigned URL with its expiry (images) or the text."""
    if result is None:
        return None
    svc = services()
    return result_payload(
        result, svc.storage, svc.settings.presign_ttl_s, fields=(RESULT_API_TEXT, RESULT_API_IMAGE)
    )


def render_jobs(
    conn: Connection, batch: Sequence[Job], fields: tuple[str, ...] = JOB_API_FIELDS
) -> list[dict[str, Any]]:
    """The API's rendering of jobs, with their results fetched in one query."""
    by_job = results_by_job(conn, batch)
    return [job_payload(job, fields, result=render_result(by_job.get(job.id))) for job in batch]


def load_owned(conn: Connection, table: Table, kind: str, tenant_id: str, object_id: str) -> RowMapping:
    """The tenant's row of `table` with this id; another tenant's id is a 404 like a missing one."""
    require_id(object_id, kind)
    row = (
        conn.execute(select(table).where(table.c.id == object_id, table.c.tenant_id == tenant_id))
        .mappings()
        .first()
    )
    if row is None:
        fail(404, "not_found", f"no {kind} {object_id!r}")
    return row


def load_job(conn: Connection, tenant_id: str, job_id: str) -> Job:
    return Job.from_row(load_owned(conn, jobs, "job", tenant_id, job_id))


@bp.post("/v1/jobs")
@bp.auth_required(auth, roles=["submit"])
@describes_body(JobIn)
@bp.output(JobOut, status_code=201, description="The queued job.")
@bp.doc(responses=[400, 409, 413, 415, 422, 429, 503])
def create_job() -> Response:
    """Submit one job; send an Idempotency-Key header to make retries safe."""
    principal = current_principal()
    svc = services()
    require_content_type()
    body = request.get_data(cache=True)

    def prepare() -> JobDraft:  # no transaction is open: the webhook's DNS check and the image's put
        draft = validate_job(parse_json_body(), svc.settings)
        put_pending_uploads(svc.storage, principal.tenant_id, [draft.pending_upload])
        return draft

    def work(conn: Connection, draft: JobDraft) -> Created:
        missing = missing_uploads(conn, principal.tenant_id, [(0, draft)], "index", svc.settings.result_ttl_s)
        if missing:
            raise SubmitError(missing[0]["code"], missing[0]["message"])
        insert_pending_uploads(conn, principal.tenant_id, [draft.pending_upload], svc.settings.result_ttl_s)
        admission = admit(conn, principal.tenant_id, 1, svc.settings)  # locks the tenant row: no I/O after
        row = (
            conn.execute(jobs.insert().values(job_row(principal.tenant_id, None, draft)).returning(*jobs.c))
            .mappings()
            .one()
        )
        created = render_jobs(conn, [Job.from_row(row)])[0]
        return Created(201, created, {(draft.task, draft.bucket)}, admission.headers())

    def discard(draft: JobDraft) -> None:
        delete_pending_uploads(svc.storage, [draft.pending_upload])

    return create_idempotently(principal.tenant_id, body, prepare, work, discard)


@bp.get("/v1/jobs/<job_id>")
@bp.auth_required(auth, roles=["read"])
@bp.output(JobOut)
def get_job(job_id: str) -> Response:
    """A job: status, stage, progress, result link, provenance and error; a queued job's estimated
    queue position."""
    principal = current_principal()
    svc = services()
    with svc.reader.connect() as conn:
        found = read_job_view(conn, principal.tenant_id, require_id(job_id, "job"), svc.settings.max_batch)
    if found is None:
        fail(404, "not_found", f"no job {job_id!r}")
    job, result, position = found
    shown = render_result(result) if job.status is JobStatus.SUCCEEDED else None
    body = job_payload(job, JOB_API_FIELDS, result=shown)
    body["queue_position"] = position
    return jsonify(body)


def encode_cursor(created_at: datetime, job_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at.isoformat(), job_id]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, job_id = parse_json(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(created), require_id(str(job_id), "cursor position")
    except (binascii.Error, UnicodeError, ValueError, TypeError) as exc:
        fail(400, "invalid_cursor", f"the cursor is not one this API gave out: {exc}")


@bp.get("/v1/jobs")
@bp.auth_required(auth, roles=["read"])
@bp.input(JobListQuery, location="query", arg_name="query")
@bp.output(JobListOut)
@bp.doc(responses=[400, 404])
def list_jobs(query: dict[str, Any]) -> Response:
    """The tenant's jobs, oldest first, optionally of one batch and/or one status; follow `next_cursor`."""
    principal = current_principal()
    limit = query["limit"]
    stmt = select(jobs).where(jobs.c.tenant_id == principal.tenant_id)
    with services().reader.connect() as conn:
        if query.get("batch_id"):
            require_id(query["batch_id"], "batch")
            owned = conn.execute(
                select(batches.c.id).where(
                    batches.c.id == query["batch_id"], batches.c.tenant_id == principal.tenant_id
                )
            ).first()
            if owned is None:
                fail(404, "not_found", f"no batch {query['batch_id']!r}")
            stmt = stmt.where(jobs.c.batch_id == query["batch_id"])
        if query.get("status"):
            stmt = stmt.where(jobs.c.status == JobStatus(query["status"]))
        if query.get("cursor"):
            created_at, last_id = decode_cursor(query["cursor"])
            stmt = stmt.where(tuple_(jobs.c.created_at, jobs.c.id) > tuple_(created_at, last_id))
        rows = conn.execute(stmt.order_by(jobs.c.created_at, jobs.c.id).limit(limit + 1)).mappings().all()
        page, more = [Job.from_row(row) for row in rows[:limit]], len(rows) > limit
        data = render_jobs(conn, page)
    next_cursor = encode_cursor(page[-1].created_at, page[-1].id) if more else None
    return jsonify({"object": "list", "data": data, "next_cursor": next_cursor, "has_more": more})


@bp.post("/v1/jobs/<job_id>/cancel")
@bp.auth_required(auth, roles=["submit"])
@bp.output(JobOut)
def cancel(job_id: str) -> Response:
    """Cancel a queued job at once; a running one stops at its next denoising step. Finished jobs stay."""
    principal = current_principal()
    require_id(job_id, "job")
    with services().engine.begin() as conn:
        job = cancel_job(conn, principal.tenant_id, job_id)
        if job is None:
            fail(404, "not_found", f"no job {job_id!r}")
        return jsonify(render_jobs(conn, [job])[0])


@bp.get("/v1/jobs/<job_id>/result")
@bp.auth_required(auth, roles=["read"])
@bp.doc(
    responses={
        200: "The text of an understand job (text/plain).",
        302: "A redirect to a short-lived presigned URL of the image.",
        409: "The job has no result (yet).",
        410: "The result was deleted after its retention (`result_expired`).",
    }
)
def get_result(job_id: str) -> BaseResponse:
    """The result: a redirect to the image, or the text of an understand job."""
    principal = current_principal()
    svc = services()
    with svc.reader.connect() as conn:
        job = load_job(conn, principal.tenant_id, job_id)
        if not job.status.terminal:
            fail(409, "not_ready", f"the job is {job.status}; its result is not ready")
        result = results_by_job(conn, [job]).get(job_id)
    if result is None:
        fail(409, "no_result", f"the job ended {job.status} without a result")
    if result.expired_at is not None:
        fail(410, "result_expired", f"the result was deleted at {result.expired_at.isoformat()} (retention)")
    if result.kind is ResultKind.TEXT or result.object_key is None:
        return Response(result.text or "", content_type="text/plain; charset=utf-8")
    return redirect(svc.storage.presign_get(result.object_key, svc.settings.presign_ttl_s).url, code=302)
