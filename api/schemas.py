"""What goes over the wire: request and response schemas (they generate the OpenAPI spec) and renderers.

Request bodies are described here but validated by core.submit, which gives every problem its own
machine-readable code; responses are rendered by core.records (jobs, results, batches) and `upload_json` here.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from apiflask import Schema
from apiflask.fields import Boolean, DateTime, Dict, File, Float, Integer, List, Nested, Raw, String
from apiflask.validators import Length, OneOf, Range
from sqlalchemy import RowMapping

from core.params import DECODERS, DEFAULTS, LANGUAGES, MAX_ASPECT_RATIO, MAX_NEW_TOKENS, SCALES, SIDE, STEPS
from core.records import TASKS, JobStatus
from core.submit import MAX_CUSTOM_ID_CHARS, MAX_METADATA_BYTES, PRIORITY_RANGE
from core.webhooks import ALL_EVENTS


def describes_body(schema: type[Schema], content_type: str = "application/json") -> Callable[[Any], Any]:
    """Put a request body into the OpenAPI spec without letting apiflask parse it (the view reads the
    raw body: it hashes it for Idempotency-Key and accepts JSONL next to JSON)."""

    def decorator(view: Any) -> Any:
        spec = getattr(view, "_spec", None) or {}
        spec.update(body=schema(), content_type=content_type)
        view._spec = spec
        return view

    return decorator


# --- requests ------------------------------------------------------------------------------------------


_GENERATE, _EDIT, _UNDERSTAND = DEFAULTS["generate"], DEFAULTS["edit"], DEFAULTS["understand"]
_SIZE = f"multiple of {SIDE.multiple}, {SIDE.low}..{SIDE.high}"
_CACHE = SCALES["cache_threshold"]


class ParamsIn(Schema):
    """The params of a job, described from core.params (which core.submit validates with)."""

    width = Integer(metadata={"description": f"{_SIZE} (default {_GENERATE['width']})"})
    height = Integer(metadata={"description": f"{_SIZE} (default {_GENERATE['height']})"})
    steps = Integer(metadata={"description": f"{STEPS.low}..{STEPS.high} (default {_GENERATE['steps']})"})
    cfg_scale = Float(
        metadata={"description": f"default {_GENERATE['cfg_scale']} (generate), {_EDIT['cfg_scale']} (edit)"}
    )
    guidance = Float(metadata={"description": f"default {_GENERATE['guidance']}"})
    seed = Integer(metadata={"description": "drawn at submission when absent, and recorded"})
    decoder = String(validate=OneOf(list(DECODERS)), metadata={"description": "edit jobs only"})
    language = String(validate=OneOf(list(LANGUAGES)))
    negative_prompt = String()
    cache_threshold = Float(
        metadata={
            "description": f"step cache (TeaCache) threshold {_CACHE.low}..{_CACHE.high}, generate and edit "
            f"(default {_GENERATE['cache_threshold']:g} = off); "
            "higher skips more DiT steps: faster, further from the uncached image"
        }
    )
    max_new_tokens = Integer(
        metadata={
            "description": f"understand jobs only, {MAX_NEW_TOKENS.low}..{MAX_NEW_TOKENS.high} "
            f"(default {_UNDERSTAND['max_new_tokens']})"
        }
    )


class WebhookIn(Schema):
    url = String(required=True)
    events = List(String(validate=OneOf(list(ALL_EVENTS))))


_IMAGE = f"a PNG, JPEG or WebP image whose longer side is at most {MAX_ASPECT_RATIO} times its shorter side"


class JobIn(Schema):
    task = String(required=True, validate=OneOf(list(TASKS)))
    prompt = String(metadata={"description": "generate"})
    instruction = String(metadata={"description": "edit and understand"})
    image = String(
        metadata={"description": f"edit, understand: an upload id (upl_...) or a data URL of {_IMAGE}"}
    )
    params = Nested(ParamsIn)
    priority = Integer(validate=Range(*PRIORITY_RANGE), metadata={"description": "higher runs first"})
    metadata = Dict(
        metadata={"description": f"your own data, at most {MAX_METADATA_BYTES // 1024} KiB as JSON"}
    )
    webhook = Nested(WebhookIn)
    custom_id = String(validate=Length(1, MAX_CUSTOM_ID_CHARS))


class BatchIn(Schema):
    jobs = List(Nested(JobIn), required=True)
    webhook = Nested(WebhookIn)
    metadata = Dict()


class BatchQuery(Schema):
    webhook_url = String(metadata={"description": "JSONL batches: the batch's webhook URL (URL-encoded)"})
    webhook_events = String(
        metadata={"description": f"comma list of {', '.join(ALL_EVENTS)} (default: all but job.progress)"}
    )
    metadata = String(
        metadata={"description": "JSONL batches: the batch's metadata, a URL-encoded JSON object"}
    )


class UploadIn(Schema):
    file = File(required=True, metadata={"description": _IMAGE})


class JobListQuery(Schema):
    batch_id = String()
    status = String(validate=OneOf([s.value for s in JobStatus]))
    cursor = String()
    limit = Integer(load_default=100, validate=Range(1, 1000))


class UsageQuery(Schema):
    from_ = String(
        data_key="from", metadata={"description": "ISO 8601 date or date-time (default: to - 30 days)"}
    )
    to = String(metadata={"description": "ISO 8601 date or date-time, exclusive (default: now)"})
    group_by = String(load_default="day", validate=OneOf(["day", "task"]))


# --- responses -----------------------------------------------------------------------------------------


class UploadOut(Schema):
    id = String(required=True)
    object = String()
    sha256 = String()
    width = Integer()
    height = Integer()
    content_type = String()
    size_bytes = Integer()
    created_at = DateTime()


class ProgressOut(Schema):
    step = Integer(allow_none=True)
    total_steps = Integer(allow_none=True)
    fraction = Float()


class ErrorInfoOut(Schema):
    code = String(allow_none=True)
    message = String(allow_none=True)


class ResultOut(Schema):
    url = String()
    expires_at = DateTime(metadata={"description": "when the presigned url stops working"})
    retained_until = DateTime(allow_none=True, metadata={"description": "when retention deletes the result"})
    expired = Boolean(metadata={"description": "true once retention deleted the result"})
    expired_at = DateTime(allow_none=True)
    text = String()
    content_type = String(allow_none=True)
    sha256 = String(allow_none=True)
    width = Integer(allow_none=True)
    height = Integer(allow_none=True)


class JobOut(Schema):
    id = String(required=True)
    object = String()
    batch_id = String(allow_none=True)
    custom_id = String(allow_none=True)
    task = String()
    status = String(validate=OneOf([s.value for s in JobStatus]))
    stage = String()
    progress = Nested(ProgressOut)
    priority = Integer()
    params = Dict()
    metadata = Dict()
    attempt = Integer()
    worker_losses = Integer()
    put_backs = Integer()
    created_at = DateTime()
    started_at = DateTime(allow_none=True)
    finished_at = DateTime(allow_none=True)
    cancel_requested = Boolean()
    error = Nested(ErrorInfoOut, allow_none=True)
    result = Nested(ResultOut, allow_none=True)
    provenance = Raw(allow_none=True)
    queue_position = Integer(
        allow_none=True,
        metadata={"description": "GET of a queued job: estimated place in its task's queue (1: next)"},
    )


class JobListOut(Schema):
    object = String()
    data = List(Nested(JobOut))
    next_cursor = String(allow_none=True)
    has_more = Boolean()


class BatchOut(Schema):
    id = String(required=True)
    object = String()
    status = String()
    total_jobs = Integer()
    counts = Dict(keys=String(), values=Integer())
    metadata = Dict()
    webhook = Raw(allow_none=True)
    cancel_requested = Boolean()
    created_at = DateTime()
    completed_at = DateTime(allow_none=True)


class UsageRowOut(Schema):
    day = String(metadata={"description": "group_by=day: the UTC date"})
    task = String(metadata={"description": "group_by=task"})
    jobs = Integer()
    model_seconds = Float(metadata={"description": "each job's share of its model call's time"})
    images = Integer()
    steps = Integer()
    pixels = Integer()
    input_tokens = Integer()
    output_tokens = Integer()


class UsageOut(Schema):
    object = String()
    from_ = String(data_key="from")
    to = String()
    group_by = String()
    data = List(Nested(UsageRowOut))
    total = Nested(UsageRowOut)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def upload_json(row: RowMapping | dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "upload",
        "sha256": row["sha256"],
        "width": row["width"],
        "height": row["height"],
        "content_type": row["content_type"],
        "size_bytes": row["size_bytes"],
        "created_at": _iso(row["created_at"]),
    }
