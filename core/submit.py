"""Job specs: validate and normalise one job (defaults, seed, bucket, webhook check) into a JobDraft.

Validation never touches the database or storage, so a whole batch is checked before anything is
created (core/ingest.py); every refusal is a SubmitError with a machine-readable code.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from core.ids import new_id
from core.images import ImageError, ImageInfo, decode_data_url, inspect_image
from core.jobs import bucket_key
from core.params import (
    DECODERS,
    DEFAULTS,
    DRAWN_SEEDS,
    LANGUAGES,
    MAX_NEGATIVE_PROMPT_CHARS,
    MAX_NEW_TOKENS,
    SCALES,
    SEED,
    SIDE,
    SPECIAL_TOKEN_MARKUP,
    STEPS,
)
from core.records import TASKS
from core.settings import Settings
from core.ssrf import LookupTimedOut, WebhookURLRefused, check_webhook_url
from core.webhooks import ALL_EVENTS

PRIORITY_RANGE = (-100, 100)
MAX_METADATA_BYTES = 16 * 1024
MAX_METADATA_DEPTH = 32  # levels of objects and arrays; deeper data cannot be echoed back safely
MAX_CUSTOM_ID_CHARS = 200
# A webhook host's name lookup at submission answers within this (or WEBHOOK_TIMEOUT_S if shorter); a
# resolver that stalls longer is infrastructure trouble, answered 503 (SubmitUnavailable).
WEBHOOK_LOOKUP_S = 5.0
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


class SubmitUnavailable(Exception):
    """A service the check needs did not answer (a stalled DNS resolver): 503 with Retry-After and `code`;
    nothing is created, and the same request may be sent again shortly."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class PendingUpload:
    """An image that came inline (data URL): put into object storage before the jobs' transaction opens
    (core.pending_uploads.put_pending_uploads), its upload row inserted in it."""

    id: str
    data: bytes
    info: ImageInfo
    object_key: str | None = None  # set once stored
    sha256: str | None = None


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


def normalize_params(task: str, raw: Any) -> dict[str, Any]:
    """Fill the defaults, check each value against core.params, and draw a seed so a retry reproduces
    the same output."""
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
        if not MAX_NEW_TOKENS.admits(params["max_new_tokens"]):
            bounds = f"{MAX_NEW_TOKENS.low} to {MAX_NEW_TOKENS.high}"
            raise SubmitError("invalid_params", f"max_new_tokens must be an integer from {bounds}")
        return params
    for name in ("width", "height"):
        if not SIDE.admits(params[name]):
            raise SubmitError(
                "invalid_size",
                f"{name} must be a multiple of {SIDE.multiple} from {SIDE.low} to {SIDE.high}, "
                f"got {params[name]!r}",
            )
    if not STEPS.admits(params["steps"]):
        raise SubmitError(
            "invalid_steps",
            f"steps must be an integer from {STEPS.low} to {STEPS.high}, got {params['steps']!r}",
        )
    for name, bound in SCALES.items():
        if not bound.admits(params[name]):
            raise SubmitError("invalid_params", f"{name} must be a number from {bound.low} to {bound.high}")
        params[name] = float(params[name])
    if params["language"] not in LANGUAGES:
        raise SubmitError("invalid_params", f"language must be {' or '.join(LANGUAGES)}")
    if task == "edit" and params["decoder"] not in DECODERS:
        raise SubmitError("invalid_params", f"decoder must be {' or '.join(DECODERS)}")
    negative = params["negative_prompt"]
    if not isinstance(negative, str) or len(negative) > MAX_NEGATIVE_PROMPT_CHARS or not storable(negative):
        raise SubmitError(
            "invalid_params",
            f"negative_prompt must be a string of at most {MAX_NEGATIVE_PROMPT_CHARS} characters",
        )
    if SPECIAL_TOKEN_MARKUP.search(negative):
        raise SubmitError("invalid_params", "negative_prompt must not contain special-token markup")
    return _with_seed(params, params.get("seed"))


def _with_seed(params: dict[str, Any], seed: Any) -> dict[str, Any]:
    """The last check of normalize_params: the seed given, or one drawn (uniform in 0 .. DRAWN_SEEDS-1)."""
    if seed is None:
        params["seed"] = _draw_seed()
    elif not SEED.admits(seed):
        raise SubmitError("invalid_params", f"seed must be an integer from {SEED.low} to {SEED.high}")
    else:
        params["seed"] = seed
    return params


# Drawn seeds come from os.urandom (what `secrets` reads), 1,024 per call: uniform in 0 .. 2**32 - 1 as
# `secrets.randbelow(DRAWN_SEEDS)` drew them, which made a urandom call and rejected half its draws for
# each (a JSONL batch's 10,000 seeds: 5 against 75 ms). A forked child starts with no pool of its own,
# so no two processes hand out the same seeds.
assert DRAWN_SEEDS == 2**32
_SEEDS_PER_READ = 1024
_seed_lock = threading.Lock()
_seed_pool: list[int] = []
os.register_at_fork(after_in_child=_seed_pool.clear)


def _draw_seed() -> int:
    with _seed_lock:
        if not _seed_pool:
            _seed_pool.extend(struct.unpack(f"<{_SEEDS_PER_READ}I", os.urandom(4 * _SEEDS_PER_READ)))
        return _seed_pool.pop()


# Raw params whose checks a batch already ran (core.ingest.validate_many): their normalised form without
# the seed, and their bucket. Keyed by task and each (name, type, value); a float by its repr, so -0.0
# and 0.0 (equal, stored differently) never share an entry. Only scalars make a key; others are checked.
ParamsCache = dict[tuple[Any, ...], tuple[dict[str, Any], str]]
PARAMS_CACHE_MAX = 1024
_SCALARS = (int, str, bool, type(None))


def _params_key(task: str, raw: Any) -> tuple[Any, ...] | None:
    if raw is None:
        return (task,)
    if type(raw) is not dict:
        return None
    key: list[Any] = [task]
    for name, value in raw.items():
        if name == "seed" and task != "understand":
            continue  # checked per line, after everything else, as normalize_params does
        kind = type(value)
        if kind is float:
            key.append((name, kind, repr(value)))
        elif kind in _SCALARS:
            key.append((name, kind, value))
        else:
            return None
    return tuple(key)


def normalize_params_cached(task: str, raw: Any, cache: ParamsCache) -> tuple[dict[str, Any], str]:
    """normalize_params and the bucket, with the checks of params seen before in `cache` not run again:
    the same result, the same SubmitError (errors are never cached), a seed drawn per call."""
    key = _params_key(task, raw)
    if key is None:
        params = normalize_params(task, raw)
        return params, bucket_key(task, params)
    hit = cache.get(key)
    seed = raw.get("seed") if raw is not None and task != "understand" else None
    if hit is None:
        unseeded = dict(raw) if raw is not None else {}
        if task != "understand":
            unseeded.pop("seed", None)
        params = normalize_params(task, unseeded)
        params.pop("seed", None)
        hit = (params, bucket_key(task, params))
        if len(cache) < PARAMS_CACHE_MAX:
            cache[key] = hit
    params = dict(hit[0])
    if task == "understand":
        return params, hit[1]
    return _with_seed(params, seed), hit[1]


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
        bound_s = min(WEBHOOK_LOOKUP_S, settings.webhook_timeout_s)
        try:
            check_webhook_url(
                url, settings.webhook_allow_private_networks, deadline=time.monotonic() + bound_s
            )
            checked[url] = None
        except LookupTimedOut as exc:  # not cached: the next request asks the resolver again
            raise SubmitUnavailable(
                "webhook_lookup_timeout",
                f"the webhook host's name lookup did not answer within {bound_s:g} s or failed for the "
                "time being; retry shortly",
            ) from exc
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
    params_cache: ParamsCache | None = None,
) -> JobDraft:
    """Check one job spec and return it normalised; raise SubmitError with a machine-readable code.

    The checks run in this order, so the first problem of a spec is the one reported:
    1. the spec is an object of known fields with a known task;
    2. its text (prompt or instruction) is a storable string of at most NEXUSGEN_MAX_PROMPT_CHARS, without
       special-token markup;
    3. its image: none for generate, else an upload id or a data URL (decoded and checked here);
    4. its params (core.params: bounds and defaults; the seed drawn) and the bucket they batch in;
    5. its priority, metadata, webhook (the URL's DNS check happens here, before any transaction opens)
       and custom_id.

    `params_cache` (one per batch) skips the checks of params the batch already passed (the result is
    the same).
    """
    task = _task(spec)
    text = _text(spec, task, settings.max_prompt_chars)
    upload_id, pending = _image(spec.get("image"), task, settings)
    params, bucket = normalize_params_cached(
        task, spec.get("params"), params_cache if params_cache is not None else {}
    )
    priority = _priority(spec.get("priority", 0))
    metadata = check_metadata(spec.get("metadata"))
    url, events = parse_webhook(
        spec.get("webhook"), settings, webhook_cache if webhook_cache is not None else {}
    )
    return JobDraft(
        task=task,
        prompt=text,
        params=params,
        bucket=bucket,
        priority=priority,
        metadata=metadata,
        upload_id=upload_id,
        pending_upload=pending,
        custom_id=_custom_id(spec.get("custom_id"), require_custom_id),
        webhook_url=url,
        webhook_events=events,
    )


def _task(spec: Any) -> str:
    """Step 1: an object of known fields whose task is known."""
    if not isinstance(spec, dict):
        raise SubmitError("invalid_job", "a job must be a JSON object")
    if not spec.keys() <= SPEC_KEYS:
        unknown = sorted(set(spec) - SPEC_KEYS)
        raise SubmitError("invalid_job", f"unknown fields {unknown}", {"allowed": sorted(SPEC_KEYS)})
    task = spec.get("task")
    if task not in TASKS:
        raise SubmitError("unknown_task", f"task must be one of {list(TASKS)}, got {task!r}")
    return str(task)


def _text(spec: dict[str, Any], task: str, max_chars: int) -> str:
    """Step 2: the prompt (generate) or instruction (edit, understand)."""
    text_field = "prompt" if task == "generate" else "instruction"
    text = spec.get(text_field)
    if not isinstance(text, str) or not text.strip():
        raise SubmitError("missing_prompt", f"a {task} job needs a non-empty string {text_field!r}")
    if not storable(text):
        raise SubmitError(
            "invalid_prompt", f"{text_field} must not contain NUL characters or lone surrogates"
        )
    if len(text) > max_chars:
        raise SubmitError("prompt_too_long", f"{text_field} has {len(text)} characters; at most {max_chars}")
    if markup := SPECIAL_TOKEN_MARKUP.search(text):
        raise SubmitError(
            "invalid_prompt", f"{text_field} must not contain special-token markup like {markup[0]}"
        )
    return text


def _image(image: Any, task: str, settings: Settings) -> tuple[str | None, PendingUpload | None]:
    """Step 3: (upload id, inline image to store) of the job's input image."""
    if task == "generate":
        if image is not None:
            raise SubmitError("invalid_image", "a generate job takes no image")
        return None, None
    if not isinstance(image, str) or not image:
        raise SubmitError("invalid_image", f"a {task} job needs an image: an upload id or a data URL")
    if image.startswith("data:"):
        try:
            data = decode_data_url(image, settings.max_upload_bytes)
            info = inspect_image(data, settings)
        except ImageError as exc:
            raise SubmitError(exc.code, exc.message) from exc
        pending = PendingUpload(id=new_id("upl"), data=data, info=info)
        return pending.id, pending
    if image.startswith("upl_") and len(image) <= 40:
        return image, None
    raise SubmitError("invalid_image", "image must be an upload id (upl_...) or a data URL")


def _priority(priority: Any) -> int:
    low, high = PRIORITY_RANGE
    if not _is_int(priority) or not low <= priority <= high:
        raise SubmitError("invalid_priority", f"priority must be an integer from {low} to {high}")
    return int(priority)


def _custom_id(custom_id: Any, required: bool) -> str | None:
    if custom_id is None and required:
        raise SubmitError("missing_custom_id", "every line of a JSONL batch needs a custom_id")
    if custom_id is not None and (
        not isinstance(custom_id, str)
        or not 1 <= len(custom_id) <= MAX_CUSTOM_ID_CHARS
        or not storable(custom_id)
    ):
        raise SubmitError(
            "invalid_custom_id", f"custom_id must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters"
        )
    return custom_id


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
