"""Job specs: validate and normalise one job (defaults, seed, bucket, webhook check) into a JobDraft.

Validation never touches the database or storage, so a whole batch is checked before anything is
created (core/ingest.py); every refusal is a SubmitError with a machine-readable code.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from core.ids import new_id
from core.images import ImageError, ImageInfo, decode_data_url, inspect_image
from core.jobs import bucket_key
from core.records import TASKS
from core.settings import Settings
from core.ssrf import WebhookURLRefused, check_webhook_url
from core.webhooks import ALL_EVENTS

PRIORITY_RANGE = (-100, 100)
MAX_METADATA_BYTES = 16 * 1024
MIN_SIDE, MAX_SIDE = 256, 2048  # output width and height; no model stage uses more of an input image
MAX_METADATA_DEPTH = 32  # levels of objects and arrays; deeper data cannot be echoed back safely
MAX_CUSTOM_ID_CHARS = 200
MAX_SEED = 2**63 - 1

# Allowed params per task, with the defaults filled in at submission (seed: drawn at submission).
_IMAGE_DEFAULTS: dict[str, Any] = {
    "width": 512,
    "height": 512,
    "steps": 50,
    "guidance": 3.5,
    "language": "en",
}
DEFAULTS: dict[str, dict[str, Any]] = {
    "generate": {**_IMAGE_DEFAULTS, "cfg_scale": 3.0, "negative_prompt": "", "cache_threshold": 0.0},
    "edit": {
        **_IMAGE_DEFAULTS,
        "cfg_scale": 1.0,
        "decoder": "edit",
        "negative_prompt": "",
        "cache_threshold": 0.0,
    },
    "understand": {"max_new_tokens": 1024},
}
SPEC_KEYS = {
    "task",
    "prompt",
    "instruction",
    "image",
    "params",
    "priority",
    "metadata",
    "webhook",
    "custom_id",
}


class SubmitError(ValueError):
    """Bad input: answered with `status` and `{"error": {"code", "message", "details"}}`."""

    def __init__(self, code: str, message: str, details: Any = None, status: int = 422) -> None:
        super().__init__(message)
        self.code, self.message, self.details, self.status = code, message, details, status


@dataclass
class PendingUpload:
    """An image that came inline (data URL) and is stored as an upload when the jobs are created."""

    id: str
    data: bytes
    info: ImageInfo


@dataclass
class JobDraft:
    """A validated, normalised job, ready to insert."""

    task: str
    prompt: str
    params: dict[str, Any]
    bucket: str
    priority: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    upload_id: str | None = None
    pending_upload: PendingUpload | None = None
    custom_id: str | None = None
    webhook_url: str | None = None
    webhook_events: list[str] | None = None


def storable(text: str) -> bool:
    """Whether Postgres can store the string: no NUL character, valid UTF-8 (no lone surrogates)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value  # not NaN


def normalize_params(task: str, raw: Any) -> dict[str, Any]:
    """Fill the defaults, check each value, and draw a seed so a retry reproduces the same output."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SubmitError("invalid_params", "params must be an object")
    allowed = DEFAULTS[task].keys() | ({"seed"} if task != "understand" else set())
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise SubmitError(
            "invalid_params", f"unknown params for {task}: {unknown}", {"allowed": sorted(allowed)}
        )
    params = {**DEFAULTS[task], **raw}
    if task == "understand":
        if not _is_int(params["max_new_tokens"]) or not 1 <= params["max_new_tokens"] <= 4096:
            raise SubmitError("invalid_params", "max_new_tokens must be an integer from 1 to 4096")
        return params
    for name in ("width", "height"):
        value = params[name]
        if not _is_int(value) or value % 16 or not MIN_SIDE <= value <= MAX_SIDE:
            raise SubmitError(
                "invalid_size",
                f"{name} must be a multiple of 16 from {MIN_SIDE} to {MAX_SIDE}, got {value!r}",
            )
    if not _is_int(params["steps"]) or not 1 <= params["steps"] <= 100:
        raise SubmitError("invalid_steps", f"steps must be an integer from 1 to 100, got {params['steps']!r}")
    # The same bounds as model.validate_request, so an accepted job never fails in the worker for them.
    for name, low, high in (("cfg_scale", 1, 30), ("guidance", 0, 30), ("cache_threshold", 0, 1)):
        if not _is_number(params[name]) or not low <= params[name] <= high:
            raise SubmitError("invalid_params", f"{name} must be a number from {low} to {high}")
        params[name] = float(params[name])
    if params["language"] not in ("en", "zh"):
        raise SubmitError("invalid_params", "language must be en or zh")
    if task == "edit" and params["decoder"] not in ("edit", "generation"):
        raise SubmitError("invalid_params", "decoder must be edit or generation")
    negative = params["negative_prompt"]
    if not isinstance(negative, str) or len(negative) > 4000 or not storable(negative):
        raise SubmitError("invalid_params", "negative_prompt must be a string of at most 4000 characters")
    seed = params.get("seed")
    if seed is None:
        params["seed"] = secrets.randbelow(2**32)
    elif not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise SubmitError("invalid_params", f"seed must be an integer from 0 to {MAX_SEED}")
    return params


def parse_webhook(
    raw: Any, settings: Settings, checked: dict[str, str | None]
) -> tuple[str | None, list[str] | None]:
    """Validate `{url, events?}`; `checked` caches URL verdicts across the lines of one batch."""
    if raw is None:
        return None, None
    if not isinstance(raw, dict) or not isinstance(raw.get("url"), str) or set(raw) - {"url", "events"}:
        raise SubmitError("invalid_webhook", "webhook must be an object {url, events?}")
    url, events = raw["url"], raw.get("events")
    if not storable(url):
        raise SubmitError("webhook_url_refused", "the webhook URL must not contain NUL characters")
    if events is not None:
        if not isinstance(events, list) or not events or any(e not in ALL_EVENTS for e in events):
            raise SubmitError(
                "invalid_webhook", f"webhook.events must be a non-empty list of {list(ALL_EVENTS)}"
            )
        events = sorted(set(events))
    if url not in checked:
        try:
            check_webhook_url(url, settings.webhook_allow_private_networks)
            checked[url] = None
        except WebhookURLRefused as exc:
            checked[url] = f"{exc.reason}: {exc}"
    if checked[url] is not None:
        raise SubmitError("webhook_url_refused", f"the webhook URL is refused ({checked[url]})")
    return url, events


def validate_job(
    spec: Any,
    settings: Settings,
    *,
    webhook_cache: dict[str, str | None] | None = None,
    require_custom_id: bool = False,
) -> JobDraft:
    """Check one job spec and return it normalised; raise SubmitError with a machine-readable code."""
    if not isinstance(spec, dict):
        raise SubmitError("invalid_job", "a job must be a JSON object")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise SubmitError("invalid_job", f"unknown fields {unknown}", {"allowed": sorted(SPEC_KEYS)})
    task = spec.get("task")
    if task not in TASKS:
        raise SubmitError("unknown_task", f"task must be one of {list(TASKS)}, got {task!r}")
    text_field = "prompt" if task == "generate" else "instruction"
    text = spec.get(text_field)
    if not isinstance(text, str) or not text.strip():
        raise SubmitError("missing_prompt", f"a {task} job needs a non-empty string {text_field!r}")
    if not storable(text):
        raise SubmitError(
            "invalid_prompt", f"{text_field} must not contain NUL characters or lone surrogates"
        )
    if len(text) > settings.max_prompt_chars:
        raise SubmitError(
            "prompt_too_long", f"{text_field} has {len(text)} characters; at most {settings.max_prompt_chars}"
        )
    draft = JobDraft(task=task, prompt=text, params={}, bucket="")
    image = spec.get("image")
    if task == "generate":
        if image is not None:
            raise SubmitError("invalid_image", "a generate job takes no image")
    elif not isinstance(image, str) or not image:
        raise SubmitError("invalid_image", f"a {task} job needs an image: an upload id or a data URL")
    elif image.startswith("data:"):
        try:
            data = decode_data_url(image, settings.max_upload_bytes)
            info = inspect_image(data, settings)
        except ImageError as exc:
            raise SubmitError(exc.code, exc.message) from exc
        draft.pending_upload = PendingUpload(id=new_id("upl"), data=data, info=info)
        draft.upload_id = draft.pending_upload.id
    elif image.startswith("upl_") and len(image) <= 40:
        draft.upload_id = image
    else:
        raise SubmitError("invalid_image", "image must be an upload id (upl_...) or a data URL")
    draft.params = normalize_params(task, spec.get("params"))
    draft.bucket = bucket_key(task, draft.params)
    priority = spec.get("priority", 0)
    if not _is_int(priority) or not PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]:
        raise SubmitError(
            "invalid_priority", f"priority must be an integer from {PRIORITY_RANGE[0]} to {PRIORITY_RANGE[1]}"
        )
    draft.priority = priority
    draft.metadata = check_metadata(spec.get("metadata"))
    draft.webhook_url, draft.webhook_events = parse_webhook(
        spec.get("webhook"), settings, webhook_cache if webhook_cache is not None else {}
    )
    custom_id = spec.get("custom_id")
    if custom_id is None and require_custom_id:
        raise SubmitError("missing_custom_id", "every line of a JSONL batch needs a custom_id")
    if custom_id is not None and (
        not isinstance(custom_id, str)
        or not 1 <= len(custom_id) <= MAX_CUSTOM_ID_CHARS
        or not storable(custom_id)
    ):
        raise SubmitError(
            "invalid_custom_id", f"custom_id must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters"
        )
    draft.custom_id = custom_id
    return draft


def parse_json(raw: bytes | str) -> Any:
    """Parse JSON; nesting too deep for the parser is a ValueError like any other invalid JSON."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None


def json_depth(value: Any) -> int:
    """How many levels of objects and arrays `value` nests (iteratively: no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_METADATA_DEPTH:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_metadata(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SubmitError("invalid_metadata", "metadata must be an object")
    if json_depth(raw) > MAX_METADATA_DEPTH:
        raise SubmitError("invalid_metadata", f"metadata nests deeper than {MAX_METADATA_DEPTH} levels")
    try:
        encoded = json.dumps(raw, ensure_ascii=False, allow_nan=False)
    except ValueError as exc:
        raise SubmitError("invalid_metadata", f"metadata must be plain JSON: {exc}") from exc
    if not storable(encoded) or "\\u0000" in encoded:
        raise SubmitError("invalid_metadata", "metadata must not contain NUL characters or lone surrogates")
    size = len(encoded.encode("utf-8"))
    if size > MAX_METADATA_BYTES:
        raise SubmitError(
            "metadata_too_large", f"metadata has {size} bytes as JSON; at most {MAX_METADATA_BYTES}"
        )
    return raw
