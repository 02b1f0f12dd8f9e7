"""The typed domain: status enums, `Job`, `Batch` and `JobResult` built once from a row, and their renderings.

Every layer speaks `job.status is JobStatus.SUCCEEDED`, never `row["status"] == "succeeded"`. The enums are
`StrEnum`s, so SQL parameters, JSON bodies and log lines carry the same strings as before. Every JSON
rendering of a job (API answers, event payloads, result lines) is a selection of `job_payload`'s fields,
and every rendering of a result one of `result_payload`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple, Protocol, Self


class Task(StrEnum):
    """A job's kind; each has its own broker queue and its own model call."""

    GENERATE = "generate"
    EDIT = "edit"
    UNDERSTAND = "understand"


TASKS: tuple[str, ...] = tuple(task.value for task in Task)


class JobStatus(StrEnum):
    """queued -> running -> succeeded | failed | canceled (running -> queued on a lost lease or retry)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        """Whether the status never changes again."""
        return self in TERMINAL_STATUSES


ACTIVE_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)
TERMINAL_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


class BatchStatus(StrEnum):
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"  # every job of the batch ended


class DeliveryStatus(StrEnum):
    """A webhook delivery: pending (retried with backoff) until it succeeds, dies, or is refused/disabled."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    DEAD = "dead"  # the retry schedule is spent
    REFUSED = "refused"  # the URL is refused by policy (SSRF guard): retrying cannot help
    DISABLED = "disabled"  # the endpoint answered 410 Gone, or was disabled before


class EventType(StrEnum):
    JOB_SUCCEEDED = "job.succeeded"
    JOB_FAILED = "job.failed"
    JOB_CANCELED = "job.canceled"
    BATCH_COMPLETED = "batch.completed"
    JOB_PROGRESS = "job.progress"  # only when a subscription names it


class ResultKind(StrEnum):
    IMAGE = "image"
    TEXT = "text"


class SignedLink(NamedTuple):
    """A presigned GET link and the moment it stops working."""

    url: str
    expires_at: datetime


class Presigner(Protocol):
    """What rendering an image result needs from object storage (core.storage.Storage)."""

    def presign_get(self, key: str, ttl_s: int) -> SignedLink: ...


def _from_row(cls: type[Any], row: Mapping[Any, Any], **converted: Any) -> Any:
    """Build dataclass `cls` from the row's columns of the same names (other columns are ignored)."""
    values = {f.name: row[f.name] for f in dataclasses.fields(cls) if f.name not in converted}
    return cls(**values, **converted)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True, slots=True)
class JobResult:
    """A succeeded job's result row: an image object in storage, or a text."""

    job_id: str
    kind: ResultKind
    object_key: str | None
    content_type: str | None
    size_bytes: int | None
    sha256: str | None
    width: int | None
    height: int | None
    text: str | None
    expires_at: datetime | None = None  # retention deletes it then (core.retention)
    expired_at: datetime | None = None  # set once retention deleted it

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Self:
        return _from_row(cls, row, kind=ResultKind(row["kind"]))  # type: ignore[no-any-return]


# The fields of each rendering of a result, in answer order.
RESULT_API_TEXT = ("content_type", "sha256", "text", "retained_until", "expired")
RESULT_API_IMAGE = (
    "content_type",
    "sha256",
    "url",
    "expires_at",
    "width",
    "height",
    "retained_until",
    "expired",
)
RESULT_EVENT_TEXT = ("kind", "text")
RESULT_EVENT_IMAGE = ("kind", "content_type", "width", "height", "sha256", "url", "expires_at")
# A result retention deleted: every rendering says so, and when.
RESULT_EXPIRED = ("kind", "content_type", "sha256", "expired", "expired_at")


def result_payload(
    result: JobResult,
    storage: Presigner | None,
    ttl_s: int,
    *,
    fields: tuple[tuple[str, ...], tuple[str, ...]] = (RESULT_API_TEXT, RESULT_API_IMAGE),
) -> dict[str, Any]:
    """A result as JSON: (text fields, image fields) of `fields`; images get a presigned URL with its expiry
    (left out without `storage`)."""
    full: dict[str, Any] = {
        "kind": result.kind,
        "content_type": result.content_type,
        "sha256": result.sha256,
        "text": result.text or "",
        "width": result.width,
        "height": result.height,
        "retained_until": _iso(result.expires_at),
        "expired": result.expired_at is not None,
        "expired_at": _iso(result.expired_at),
    }
    if result.expired_at is not None:
        return {name: full[name] for name in RESULT_EXPIRED}
    if result.kind is ResultKind.IMAGE and storage is not None and result.object_key:
        link = storage.presign_get(result.object_key, ttl_s)
        full["url"], full["expires_at"] = link.url, link.expires_at.isoformat()
    names = fields[0] if result.kind is ResultKind.TEXT else fields[1]
    return {name: full[name] for name in names if name in full}


@dataclass(frozen=True, slots=True)
class Job:
    """One job, as its row in `jobs` holds it."""

    id: str
    tenant_id: str
    batch_id: str | None
    custom_id: str | None
    task: Task
    prompt: str
    upload_id: str | None
    params: dict[str, Any]
    bucket: str
    priority: int
    status: JobStatus
    stage: str
    step: int | None
    total_steps: int | None
    progress: float
    attempt: int
    worker_losses: int  # claims that ended with the worker lost (count toward poison)
    put_backs: int  # claims put back after a transient infrastructure error (do not)
    lease_owner: str | None
    lease_expires_at: datetime | None
    cancel_requested: bool
    error_code: str | None
    error_message: str | None
    provenance: dict[str, Any] | None
    metadata: dict[str, Any]
    webhook_url: str | None
    webhook_events: list[str] | None
    created_at: datetime
    enqueued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Self:
        """The job of a full `jobs` row (select(jobs) or RETURNING *jobs.c)."""
        return _from_row(  # type: ignore[no-any-return]
            cls,
            row,
            task=Task(row["task"]),
            status=JobStatus(row["status"]),
            params=row["params"] or {},
            metadata=row["metadata"] or {},
        )

    @property
    def error(self) -> dict[str, Any] | None:
        """`{code, message}` of a failed job, else None."""
        if self.status is not JobStatus.FAILED:
            return None
        return {"code": self.error_code, "message": self.error_message}


# The fields of each rendering of a job, in answer order; each starts with what names the job.
_JOB_IDENTITY = ("id", "object", "batch_id", "custom_id", "task", "status")
JOB_API_FIELDS = (
    *_JOB_IDENTITY,
    "stage",
    "progress",
    "priority",
    "params",
    "metadata",
    "attempt",
    "worker_losses",
    "put_backs",
    "created_at",
    "started_at",
    "finished_at",
    "cancel_requested",
    "error",
    "result",
    "provenance",
)
JOB_EVENT_FIELDS = (*_JOB_IDENTITY, "metadata", "links")
JOB_PROGRESS_FIELDS = (*_JOB_IDENTITY, "stage", "step", "total_steps", "metadata", "links")
JOB_RESULT_LINE_FIELDS = ("custom_id", "job_id", "task", "status", "result", "error")


def job_payload(
    job: Job,
    fields: Iterable[str] = JOB_API_FIELDS,
    *,
    result: dict[str, Any] | None = None,
    base_url: str = "",
) -> dict[str, Any]:
    """A job as JSON, the named `fields` of it. `result` is the rendered result (result_payload), shown
    for a succeeded job only; links are relative unless `base_url` is given."""
    links = {"self": f"{base_url}/v1/jobs/{job.id}"}
    if job.status is JobStatus.SUCCEEDED:
        links["result"] = f"{base_url}/v1/jobs/{job.id}/result"
    full: dict[str, Any] = {
        "id": job.id,
        "job_id": job.id,
        "object": "job",
        "batch_id": job.batch_id,
        "custom_id": job.custom_id,
        "task": job.task,
        "status": job.status,
        "stage": job.stage,
        "step": job.step,
        "total_steps": job.total_steps,
        "progress": {"step": job.step, "total_steps": job.total_steps, "fraction": job.progress},
        "priority": job.priority,
        "params": job.params,
        "metadata": job.metadata,
        "attempt": job.attempt,
        "worker_losses": job.worker_losses,
        "put_backs": job.put_backs,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "cancel_requested": job.cancel_requested,
        "error": job.error,
        "result": result if job.status is JobStatus.SUCCEEDED else None,
        "provenance": job.provenance,
        "links": links,
    }
    return {name: full[name] for name in fields}


def job_event_data(job: Job) -> dict[str, Any]:
    """The thin event payload of a job: ids, status, error and links, never the image itself."""
    fields = JOB_EVENT_FIELDS + (("error",) if job.status is JobStatus.FAILED else ())
    return job_payload(job, fields)


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch, as its row in `batches` holds it."""

    id: str
    tenant_id: str
    metadata: dict[str, Any]
    webhook_url: str | None
    webhook_events: list[str] | None
    total_jobs: int
    cancel_requested: bool
    created_at: datetime
    completed_at: datetime | None

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Self:
        return _from_row(cls, row, metadata=row["metadata"] or {})  # type: ignore[no-any-return]

    @property
    def status(self) -> BatchStatus:
        return BatchStatus.COMPLETED if self.completed_at is not None else BatchStatus.IN_PROGRESS


BATCH_API_FIELDS = (
    "id",
    "object",
    "status",
    "total_jobs",
    "counts",
    "metadata",
    "webhook",
    "cancel_requested",
    "created_at",
    "completed_at",
)
BATCH_EVENT_FIELDS = ("id", "object", "counts", "total", "metadata", "links")


def batch_payload(
    batch: Batch,
    counts: Mapping[str, int],
    fields: Iterable[str] = BATCH_API_FIELDS,
    *,
    statuses: Iterable[JobStatus] = JobStatus,
) -> dict[str, Any]:
    """A batch as JSON, the named `fields` of it, with its job counts for each of `statuses`."""
    webhook = None
    if batch.webhook_url:
        webhook = {"url": batch.webhook_url, "events": batch.webhook_events}
    full: dict[str, Any] = {
        "id": batch.id,
        "object": "batch",
        "status": batch.status,
        "total_jobs": batch.total_jobs,
        "total": batch.total_jobs,
        "counts": {status.value: int(counts.get(status, 0)) for status in statuses},
        "metadata": batch.metadata,
        "webhook": webhook,
        "cancel_requested": batch.cancel_requested,
        "created_at": _iso(batch.created_at),
        "completed_at": _iso(batch.completed_at),
        "links": {"self": f"/v1/batches/{batch.id}", "results": f"/v1/batches/{batch.id}/results"},
    }
    return {name: full[name] for name in fields}
