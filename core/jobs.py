"""The job state machine: every status change is an idempotent conditional UPDATE in this module.

queued -> running -> succeeded | failed | canceled, and running -> queued (lease expired, retry).
Each worker-side transition names the attempt it belongs to, so a stale worker's late write is rejected.
Every terminal transition writes its outbox event in the same transaction.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, RowMapping, and_, exists, func, select, update

from core.ids import new_id
from core.schema import TERMINAL_STATUSES, batches, jobs, results
from core.webhooks import enqueue_event, enqueue_progress_event

ACTIVE = ("queued", "running")


def bucket_key(task: str, params: dict[str, Any]) -> str:
    """Jobs with equal keys can share one model call: task, decoder, output size, steps, cfg and guidance."""
    if task == "understand":
        return f"understand|{params.get('max_new_tokens', 1024)}"
    decoder = params.get("decoder", "generation") if task == "edit" else "generation"
    return (
        f"{task}|{decoder}|{params['width']}x{params['height']}|{params['steps']}"
        f"|{float(params['cfg_scale']):g}|{float(params['guidance']):g}"
    )


def describe_bucket(bucket: str) -> str:
    """A bucket key in words, for admins: 'generate 512x512, 50 steps, cfg 3, guidance 3.5'."""
    parts = bucket.split("|")
    if parts[0] == "understand" and len(parts) == 2:
        return f"understand, up to {parts[1]} tokens"
    if len(parts) != 6:
        return bucket
    task, decoder, size, steps, cfg, guidance = parts
    kind = task if task == "generate" else f"{task} ({decoder} decoder)"
    return f"{kind} {size}, {steps} steps, cfg {cfg}, guidance {guidance}"


def job_event_data(row: RowMapping | dict[str, Any], base_url: str = "") -> dict[str, Any]:
    """The thin event payload for a job: ids, status, error and links, never the image itself."""
    data: dict[str, Any] = {
        "id": row["id"],
        "object": "job",
        "batch_id": row["batch_id"],
        "custom_id": row["custom_id"],
        "task": row["task"],
        "status": row["status"],
        "metadata": row["metadata"],
        "links": {"self": f"{base_url}/v1/jobs/{row['id']}"},
    }
    if row["status"] == "succeeded":
        data["links"]["result"] = f"{base_url}/v1/jobs/{row['id']}/result"
    if row["status"] == "failed":
        data["error"] = {"code": row["error_code"], "message": row["error_message"]}
    return data


def _announce(conn: Connection, row: RowMapping, event_type: str) -> None:
    enqueue_event(
        conn,
        tenant_id=row["tenant_id"],
        event_type=event_type,
        data=job_event_data(row),
        url=row["webhook_url"],
        events=row["webhook_events"],
        job_id=row["id"],
        batch_id=row["batch_id"],
    )
    if row["batch_id"] is not None:
        maybe_complete_batch(conn, row["batch_id"])


def maybe_complete_batch(conn: Connection, batch_id: str) -> bool:
    """Mark the batch completed once its last job ended, and announce it exactly once."""
    # Lock the batch row so two transactions ending the last two jobs cannot both miss the completion.
    conn.execute(select(batches.c.id).where(batches.c.id == batch_id).with_for_update())
    active = exists().where(jobs.c.batch_id == batch_id, jobs.c.status.in_(ACTIVE))
    row = (
        conn.execute(
            update(batches)
            .where(batches.c.id == batch_id, batches.c.completed_at.is_(None), ~active)
            .values(completed_at=func.now())
            .returning(*batches.c)
        )
        .mappings()
        .first()
    )
    if row is None:
        return False
    counts: dict[str, int] = dict(
        conn.execute(
            select(jobs.c.status, func.count()).where(jobs.c.batch_id == batch_id).group_by(jobs.c.status)
        ).all()
    )
    enqueue_event(
        conn,
        tenant_id=row["tenant_id"],
        event_type="batch.completed",
        data={
            "id": batch_id,
            "object": "batch",
            "counts": {s: int(counts.get(s, 0)) for s in TERMINAL_STATUSES},
            "total": row["total_jobs"],
            "metadata": row["metadata"],
            "links": {"self": f"/v1/batches/{batch_id}", "results": f"/v1/batches/{batch_id}/results"},
        },
        url=row["webhook_url"],
        events=row["webhook_events"],
        batch_id=batch_id,
    )
    return True


def claim_batch(
    conn: Connection,
    *,
    worker_id: str,
    tasks: Sequence[str],
    max_batch: int,
    lease_s: float,
    bucket: str | None = None,
) -> list[RowMapping]:
    """Claim up to `max_batch` queued jobs of one bucket (priority, then age), exclusively."""
    head_q = select(jobs.c.bucket).where(
        jobs.c.status == "queued", jobs.c.task.in_(list(tasks)), jobs.c.cancel_requested.is_(False)
    )
    if bucket is not None:
        head_q = head_q.where(jobs.c.bucket == bucket)
    head = conn.execute(
        head_q.order_by(jobs.c.priority.desc(), jobs.c.created_at, jobs.c.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    ).first()
    if head is None:
        return []
    ids = (
        conn.execute(
            select(jobs.c.id)
            .where(
                jobs.c.status == "queued", jobs.c.bucket == head.bucket, jobs.c.cancel_requested.is_(False)
            )
            .order_by(jobs.c.priority.desc(), jobs.c.created_at, jobs.c.id)
            .limit(max_batch)
            .with_for_update(skip_locked=True)
        )
        .scalars()
        .all()
    )
    rows = (
        conn.execute(
            update(jobs)
            .where(jobs.c.id.in_(ids), jobs.c.status == "queued")
            .values(
                status="running",
                stage="starting",
                step=None,
                attempt=jobs.c.attempt + 1,
                lease_owner=worker_id,
                lease_expires_at=func.now() + timedelta(seconds=lease_s),
                started_at=func.coalesce(jobs.c.started_at, func.now()),
                updated_at=func.now(),
            )
            .returning(*jobs.c)
        )
        .mappings()
        .all()
    )
    order = {job_id: i for i, job_id in enumerate(ids)}
    return sorted(rows, key=lambda r: order[r["id"]])


class Ack(enum.Enum):
    """What a worker learns when it reports on a job it runs."""

    OWNED = "owned"
    CANCEL_REQUESTED = "cancel_requested"
    LOST = "lost"  # the lease expired and the job was requeued or ended: stop and write nothing


def _owned(job_id: str, attempt: int) -> Any:
    return and_(jobs.c.id == job_id, jobs.c.status == "running", jobs.c.attempt == attempt)


def _ended(status: str, stage: str | None = None, **extra: Any) -> dict[str, Any]:
    """Column values of a terminal transition: the lease is released and the job finished now."""
    return {
        "status": status,
        "stage": stage or status,
        "lease_owner": None,
        "lease_expires_at": None,
        "finished_at": func.now(),
        "updated_at": func.now(),
        **extra,
    }


def _back_in_queue(**extra: Any) -> dict[str, Any]:
    """Column values of running -> queued: the lease is released and the job counts as just enqueued."""
    return {
        "status": "queued",
        "stage": "queued",
        "step": None,
        "lease_owner": None,
        "lease_expires_at": None,
        "enqueued_at": func.now(),
        "updated_at": func.now(),
        **extra,
    }


def _transition(conn: Connection, cond: Any, values: dict[str, Any]) -> list[RowMapping]:
    """One conditional UPDATE of the jobs matching `cond`; returns the changed rows."""
    return list(conn.execute(update(jobs).where(cond).values(**values).returning(*jobs.c)).mappings().all())


def record_progress(
    conn: Connection,
    job_id: str,
    attempt: int,
    *,
    stage: str,
    step: int | None = None,
    total_steps: int | None = None,
    progress: float | None = None,
    lease_s: float | None = None,
) -> Ack:
    """Record the stage and step (and extend the lease); tell the worker whether to go on."""
    values: dict[str, Any] = {
        "stage": stage,
        "step": step,
        "total_steps": total_steps,
        "updated_at": func.now(),
    }
    if progress is not None:
        values["progress"] = progress
    if lease_s is not None:
        values["lease_expires_at"] = func.now() + timedelta(seconds=lease_s)
    row = (
        conn.execute(update(jobs).where(_owned(job_id, attempt)).values(**values).returning(*jobs.c))
        .mappings()
        .first()
    )
    if row is None:
        return Ack.LOST
    enqueue_progress_event(conn, row, stage, step, total_steps)  # only if asked for, at most every few s
    return Ack.CANCEL_REQUESTED if row["cancel_requested"] else Ack.OWNED


def heartbeat(conn: Connection, claims: Sequence[tuple[str, int]], lease_s: float) -> dict[str, Ack]:
    """Extend the leases of the (job id, attempt) pairs a worker holds; answer per job."""
    acks: dict[str, Ack] = {job_id: Ack.LOST for job_id, _ in claims}
    for job_id, attempt in claims:
        row = conn.execute(
            update(jobs)
            .where(_owned(job_id, attempt))
            .values(lease_expires_at=func.now() + timedelta(seconds=lease_s))
            .returning(jobs.c.cancel_requested)
        ).first()
        if row is not None:
            acks[job_id] = Ack.CANCEL_REQUESTED if row.cancel_requested else Ack.OWNED
    return acks


def complete_job(
    conn: Connection,
    job_id: str,
    attempt: int,
    *,
    provenance: dict[str, Any],
    result: dict[str, Any],
) -> bool:
    """running -> succeeded with its result row and event; False if this attempt no longer owns the job.

    `result` holds the columns of the results table (kind, object_key, content_type, size_bytes, sha256,
    width, height, text).
    """
    rows = _transition(
        conn, _owned(job_id, attempt), _ended("succeeded", "done", progress=1.0, provenance=provenance)
    )
    if not rows:
        return False
    conn.execute(results.insert().values(id=new_id("res"), job_id=job_id, **result))
    _announce(conn, rows[0], "job.succeeded")
    return True


def fail_job(
    conn: Connection,
    job_id: str,
    attempt: int | None,
    *,
    code: str,
    message: str,
    provenance: dict[str, Any] | None = None,
) -> bool:
    """running (or queued, when attempt is None) -> failed with an error code; announce it."""
    cond = (
        _owned(job_id, attempt)
        if attempt is not None
        else and_(jobs.c.id == job_id, jobs.c.status.in_(ACTIVE))
    )
    values = _ended("failed", error_code=code, error_message=message[:4000])
    if provenance is not None:
        values["provenance"] = provenance
    rows = _transition(conn, cond, values)
    if not rows:
        return False
    _announce(conn, rows[0], "job.failed")
    return True


def requeue_job(conn: Connection, job_id: str, attempt: int, *, reason: str) -> bool:
    """running -> queued (transient error, batch split after OOM); the next claim counts a new attempt.

    A job whose cancel was requested ends `canceled` instead: claims skip such jobs, so requeued it
    would wait forever.
    """
    if _cancel_running(conn, and_(_owned(job_id, attempt), jobs.c.cancel_requested.is_(True))):
        return True
    return bool(_transition(conn, _owned(job_id, attempt), _back_in_queue(error_message=reason[:4000])))


def _cancel_running(conn: Connection, cond: Any) -> list[RowMapping]:
    """running -> canceled for the jobs matching `cond`; announce each."""
    rows = _transition(conn, cond, _ended("canceled"))
    for row in rows:
        _announce(conn, row, "job.canceled")
    return rows


def mark_canceled(conn: Connection, job_id: str, attempt: int) -> bool:
    """running -> canceled, by the worker that stopped at a step boundary after a cancel request."""
    return bool(_cancel_running(conn, _owned(job_id, attempt)))


def cancel_job(conn: Connection, tenant_id: str, job_id: str) -> RowMapping | None:
    """Cancel a queued job at once, or ask a running one to stop; finished jobs are left as they are.

    Returns the job row after the change, or None if the tenant has no such job.
    """
    queued = and_(jobs.c.id == job_id, jobs.c.tenant_id == tenant_id, jobs.c.status == "queued")
    canceled = _transition(conn, queued, _ended("canceled", cancel_requested=True))
    if canceled:
        _announce(conn, canceled[0], "job.canceled")
        return canceled[0]
    conn.execute(
        update(jobs)
        .where(jobs.c.id == job_id, jobs.c.tenant_id == tenant_id, jobs.c.status == "running")
        .values(cancel_requested=True, updated_at=func.now())
    )
    return (
        conn.execute(select(*jobs.c).where(jobs.c.id == job_id, jobs.c.tenant_id == tenant_id))
        .mappings()
        .first()
    )


def cancel_batch(conn: Connection, tenant_id: str, batch_id: str) -> int | None:
    """Cancel every queued job of a batch and ask its running ones to stop; None if no such batch."""
    found = conn.execute(
        select(batches.c.id).where(batches.c.id == batch_id, batches.c.tenant_id == tenant_id)
    ).first()
    if found is None:
        return None
    rows = _transition(
        conn,
        and_(jobs.c.batch_id == batch_id, jobs.c.status == "queued"),
        _ended("canceled", cancel_requested=True),
    )
    conn.execute(
        update(jobs)
        .where(jobs.c.batch_id == batch_id, jobs.c.status == "running")
        .values(cancel_requested=True, updated_at=func.now())
    )
    for row in rows:
        enqueue_event(
            conn,
            tenant_id=row["tenant_id"],
            event_type="job.canceled",
            data=job_event_data(row),
            url=row["webhook_url"],
            events=row["webhook_events"],
            job_id=row["id"],
            batch_id=batch_id,
        )
    conn.execute(update(batches).where(batches.c.id == batch_id).values(cancel_requested=True))
    maybe_complete_batch(conn, batch_id)
    return len(rows)


def request_cancel_of_owner(conn: Connection, lease_owner: str) -> list[str]:
    """Ask every running job held under `lease_owner` (one batch task) to stop; returns their ids."""
    return list(
        conn.execute(
            update(jobs)
            .where(jobs.c.status == "running", jobs.c.lease_owner == lease_owner)
            .values(cancel_requested=True, updated_at=func.now())
            .returning(jobs.c.id)
        ).scalars()
    )


def end_leases(conn: Connection, claims: Sequence[tuple[str, int]]) -> int:
    """Let the leases of (job id, attempt) claims run out now: the next sweep requeues (or poisons) them.

    For a batch that crashed: its jobs go through the same attempt accounting as a lost worker's.
    """
    ended = 0
    for job_id, attempt in claims:
        ended += len(_transition(conn, _owned(job_id, attempt), {"lease_expires_at": func.now()}))
    return ended


def expire_leases(conn: Connection, *, max_attempts: int) -> tuple[list[RowMapping], list[RowMapping]]:
    """Requeue running jobs whose lease ran out; fail those that used up their attempts (poison jobs).

    Returns (requeued rows, failed rows); the caller re-publishes wake-ups for the requeued ones.
    """
    expired = and_(jobs.c.status == "running", jobs.c.lease_expires_at < func.now())
    # A job whose cancel was requested is not retried: it ends canceled (claims would skip it forever).
    _cancel_running(conn, and_(expired, jobs.c.cancel_requested.is_(True)))
    message = f"the job's worker was lost {max_attempts} times; not retried again"
    failed = _transition(
        conn,
        and_(expired, jobs.c.attempt >= max_attempts),
        _ended("failed", error_code="poison_job", error_message=message),
    )
    for row in failed:
        _announce(conn, row, "job.failed")
    requeued = _transition(conn, expired, _back_in_queue())
    return requeued, failed


def take_unclaimed(conn: Connection, *, older_than_s: float, limit: int = 1000) -> list[RowMapping]:
    """Queued jobs nobody claimed for a while (a lost wake-up): stamp and return them to re-publish."""
    stale = (
        select(jobs.c.id)
        .where(jobs.c.status == "queued", jobs.c.enqueued_at < func.now() - timedelta(seconds=older_than_s))
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return list(
        conn.execute(
            update(jobs)
            .where(jobs.c.id.in_(stale))
            .values(enqueued_at=func.now())
            .returning(jobs.c.id, jobs.c.task, jobs.c.bucket)
        )
        .mappings()
        .all()
    )
