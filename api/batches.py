"""Batches: submit many jobs at once (JSON or JSONL, all or nothing), read counts, stream results, cancel."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from apiflask import APIBlueprint
from flask import Response, jsonify, request, stream_with_context
from sqlalchemy import Connection, select

from api.auth import auth, current_principal
from api.context import services
from api.errors import fail
from api.idempotency import Created, create_idempotently
from api.jobs import load_owned, parse_json_body, render_jobs, require_content_type, require_id
from api.schemas import BatchIn, BatchOut, BatchQuery, describes_body
from core.ids import new_id
from core.ingest import (
    checks_offline,
    copy_validated,
    cyclic_gc_paused,
    insert_jobs,
    parse_jsonl,
    validate_many,
)
from core.jobs import cancel_batch, count_by_status
from core.limits import LimitExceeded, admit
from core.pending_uploads import (
    delete_pending_uploads,
    insert_pending_uploads,
    missing_uploads,
    put_pending_uploads,
)
from core.records import JOB_RESULT_LINE_FIELDS, Batch, Job, JobStatus, batch_payload
from core.schema import batches, jobs
from core.settings import Settings
from core.submit import JobDraft, SubmitError, check_metadata, parse_json, parse_webhook

bp = APIBlueprint("batches", __name__, tag="Batches")

JSONL_TYPES = (
    "application/x-ndjson",
    "application/jsonl",
    "application/x-jsonlines",
    "application/json-lines",
)
RESULTS_PAGE = 1000


def batch_options(query: dict[str, Any]) -> tuple[dict[str, Any] | None, Any]:
    """The batch-level webhook (`{url, events}`) and metadata given as query parameters, not yet checked.

    `webhook_events` is a comma list; `metadata` a URL-encoded JSON object.
    """
    webhook: dict[str, Any] | None = None
    if query.get("webhook_url") is not None:
        webhook = {"url": query["webhook_url"]}
        if query.get("webhook_events") is not None:
            webhook["events"] = [e.strip() for e in query["webhook_events"].split(",") if e.strip()]
    elif query.get("webhook_events") is not None:
        raise SubmitError("invalid_webhook", "webhook_events needs webhook_url")
    metadata = None
    if query.get("metadata") is not None:
        try:
            metadata = parse_json(query["metadata"])
        except ValueError as exc:
            raise SubmitError("invalid_metadata", f"the metadata parameter is not JSON: {exc}") from exc
        if metadata is None:
            raise SubmitError("invalid_metadata", "metadata must be an object")
    return webhook, metadata


@dataclass
class ParsedBatch:
    """A batch body validated before the transaction opens; `errors` are raised in it, together with the
    upload ids that only the database can find missing. Or, when no line's checks need I/O, its lines
    still `unchecked`: the transaction checks them as it copies them (core.ingest.copy_validated)."""

    drafts: list[tuple[int, JobDraft]]
    errors: list[dict[str, Any]]
    metadata: dict[str, Any]
    webhook: tuple[str | None, list[str] | None]
    jsonl: bool
    total: int
    unchecked: list[tuple[int, Any]] = field(default_factory=list)

    @property
    def position(self) -> str:
        return "line" if self.jsonl else "index"

    def raise_errors(self, more: list[dict[str, Any]]) -> None:
        """One SubmitError naming EVERY bad line (or index), if any."""
        errors = sorted(self.errors + more, key=lambda e: e[self.position])
        if errors:
            raise SubmitError(
                "invalid_jsonl" if self.jsonl else "invalid_batch",
                f"{len(errors)} of {self.total} jobs are invalid; nothing was created",
                {"errors": errors},
            )


def _parse_batch(settings: Settings, query: dict[str, Any]) -> ParsedBatch:
    """Validate the whole body (webhook URLs resolved here, before any transaction), collecting the bad
    lines, or leave its lines to copy_validated when none needs I/O to be checked; raise a SubmitError at
    once for a problem of the batch itself."""
    jsonl = request.mimetype in JSONL_TYPES
    position = "line" if jsonl else "index"
    raw_webhook, raw_metadata = batch_options(query)
    if jsonl:
        items, errors = parse_jsonl(request.get_data(cache=True))
    else:
        body = parse_json_body()
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("jobs"), list)
            or set(body) - {"jobs", "webhook", "metadata"}
        ):
            raise SubmitError("invalid_batch", "the body must be {jobs: [...], webhook?, metadata?}")
        for name, given in (("webhook", raw_webhook), ("metadata", raw_metadata)):
            if given is not None and body.get(name) is not None:
                raise SubmitError(
                    f"invalid_{name}", f"{name} is given both in the body and as a query parameter"
                )
        raw_webhook = raw_webhook if raw_webhook is not None else body.get("webhook")
        raw_metadata = raw_metadata if raw_metadata is not None else body.get("metadata")
        items, errors = list(enumerate(body["jobs"])), []
    metadata = check_metadata(raw_metadata)
    webhook = parse_webhook(raw_webhook, settings, {})
    total = len(items) + len(errors)
    if total == 0:
        raise SubmitError("empty_batch", "the batch has no jobs")
    if len(items) > settings.max_batch_jobs:
        raise SubmitError(
            "too_many_jobs", f"a batch takes at most {settings.max_batch_jobs} jobs", status=413
        )
    if not errors and all(checks_offline(spec) for _, spec in items):
        return ParsedBatch([], [], metadata, webhook, jsonl, total, unchecked=items)
    numbered, invalid = validate_many(
        items, settings, position=position, require_custom_id=jsonl, inherited_webhook=webhook
    )
    return ParsedBatch(numbered, errors + invalid, metadata, webhook, jsonl, total)


def _load_batch(conn: Connection, tenant_id: str, batch_id: str) -> Batch:
    return Batch.from_row(load_owned(conn, batches, "batch", tenant_id, batch_id))


@bp.post("/v1/batches")
@bp.auth_required(auth, roles=["submit"])
@bp.input(BatchQuery, location="query", arg_name="query")
@describes_body(BatchIn)
@bp.output(BatchOut, status_code=201, description="The batch with its job counts.")
@bp.doc(responses=[400, 409, 413, 415, 422, 429, 503])
def create_batch(query: dict[str, Any]) -> Response:
    """Submit many jobs: JSON `{jobs, webhook, metadata}` or JSONL (`application/x-ndjson`, one job a line,
    each with a unique custom_id). A JSONL batch takes its webhook and metadata as query parameters
    (`webhook_url`, `webhook_events`, `metadata`); a line may still set its own webhook. Any invalid line:
    422 naming every bad line, and nothing is created."""
    principal = current_principal()
    svc = services()
    require_content_type(*JSONL_TYPES)

    def prepare() -> ParsedBatch:  # no transaction is open: webhook DNS checks and image puts
        parsed = _parse_batch(svc.settings, query)
        if not parsed.errors:  # a batch with bad lines creates nothing: store no image for it
            put_pending_uploads(
                svc.storage, principal.tenant_id, (d.pending_upload for _, d in parsed.drafts)
            )
        return parsed

    def work(conn: Connection, parsed: ParsedBatch) -> Created:
        settings = svc.settings
        parsed.raise_errors(
            missing_uploads(conn, principal.tenant_id, parsed.drafts, parsed.position, settings.result_ttl_s)
        )
        drafts = [draft for _, draft in parsed.drafts]
        count = len(parsed.unchecked) or len(drafts)
        url, events = parsed.webhook
        row = (
            conn.execute(
                batches.insert()
                .values(
                    id=new_id("bat"),
                    tenant_id=principal.tenant_id,
                    metadata=parsed.metadata,
                    webhook_url=url,
                    webhook_events=events,
                    total_jobs=count,
                )
                .returning(*batches.c)
            )
            .mappings()
            .one()
        )
        insert_pending_uploads(
            conn, principal.tenant_id, (d.pending_upload for d in drafts), settings.result_ttl_s
        )
        try:  # all or nothing; locks the tenant row, so no network I/O after this
            admission = admit(conn, principal.tenant_id, count, settings)
        except LimitExceeded:
            if parsed.unchecked:  # a bad line answers 422 before a limit's 429, as when checked first
                parsed.raise_errors(
                    validate_many(
                        parsed.unchecked,
                        settings,
                        position=parsed.position,
                        require_custom_id=parsed.jsonl,
                        inherited_webhook=parsed.webhook,
                    )[1]
                )
            raise
        if parsed.unchecked:  # Postgres inserts the lines sent while the next ones are checked
            wakeups, errors = copy_validated(
                conn,
                principal.tenant_id,
                row["id"],
                parsed.unchecked,
                settings,
                position=parsed.position,
                require_custom_id=parsed.jsonl,
                inherited_webhook=parsed.webhook,
            )
            parsed.raise_errors(errors)
        else:
            wakeups = insert_jobs(conn, principal.tenant_id, row["id"], drafts)
        return Created(
            201,
            batch_payload(Batch.from_row(row), {JobStatus.QUEUED: count}),
            wakeups,
            admission.headers(),
        )

    def discard(parsed: ParsedBatch) -> None:
        delete_pending_uploads(svc.storage, (d.pending_upload for _, d in parsed.drafts))

    # The query parameters are part of the request: the same body with another webhook is another request.
    fingerprint = request.get_data(cache=True)
    if request.query_string:
        fingerprint = request.query_string + b"\0" + fingerprint
    with cyclic_gc_paused():
        return create_idempotently(principal.tenant_id, fingerprint, prepare, work, discard)


@bp.get("/v1/batches/<batch_id>")
@bp.auth_required(auth, roles=["read"])
@bp.output(BatchOut)
def get_batch(batch_id: str) -> Response:
    """A batch and its job counts by status."""
    principal = current_principal()
    with services().reader.connect() as conn:
        batch = _load_batch(conn, principal.tenant_id, batch_id)
        return jsonify(batch_payload(batch, count_by_status(conn, batch_id)))


@bp.get("/v1/batches/<batch_id>/results")
@bp.auth_required(auth, roles=["read"])
@bp.doc(responses={200: "JSONL, one line a job: custom_id, job_id, status, result (URL or text), error."})
def get_results(batch_id: str) -> Response:
    """Stream the batch's results as JSONL, page by page (keyset on the job id), whatever its size."""
    principal = current_principal()
    svc = services()
    with svc.engine.connect() as conn:
        _load_batch(conn, principal.tenant_id, batch_id)

    def lines() -> Iterator[str]:
        last = ""
        while True:
            with svc.engine.connect() as conn:
                page = [
                    Job.from_row(row)
                    for row in conn.execute(
                        select(jobs)
                        .where(jobs.c.batch_id == batch_id, jobs.c.id > last)
                        .order_by(jobs.c.id)
                        .limit(RESULTS_PAGE)
                    ).mappings()
                ]
                records = render_jobs(conn, page, JOB_RESULT_LINE_FIELDS)
            for record in records:
                yield json.dumps(record, ensure_ascii=False) + "\n"
            if len(page) < RESULTS_PAGE:
                return
            last = page[-1].id

    return Response(stream_with_context(lines()), mimetype="application/x-ndjson")


@bp.post("/v1/batches/<batch_id>/cancel")
@bp.auth_required(auth, roles=["submit"])
@bp.output(BatchOut)
def cancel(batch_id: str) -> Response:
    """Cancel every queued job of the batch and stop its running ones; finished jobs keep their results."""
    principal = current_principal()
    require_id(batch_id, "batch")
    with services().engine.begin() as conn:
        if cancel_batch(conn, principal.tenant_id, batch_id) is None:
            fail(404, "not_found", f"no batch {batch_id!r}")
        batch = _load_batch(conn, principal.tenant_id, batch_id)
        return jsonify(batch_payload(batch, count_by_status(conn, batch_id)))
