"""The job state machine: every status change is an idempotent conditional UPDATE in this module.

queued -> running -> succeeded | failed | canceled, and running -> queued (lease expired, retry).
Each worker-side transition names the attempt it belongs to, so a stale worker's late write is rejected.
Every terminal transition writes its outbox event in the same transaction.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    Integer,
    Interval,
    RowMapping,
    Select,
    String,
    and_,
    bindparam,
    exists,
    func,
    select,
    update,
)

from core.counts import queued_tasks
from core.events import log_claimed, log_states
from core.fair_share import (
    Group,
    Head,
    fill_order,
    group_slots,
    group_values,
    oldest_ids,
    queue_head,
    turn_taken,
)
from core.ids import new_id
from core.limits import running_room
from core.records import (
    ACTIVE_STATUSES,
    BATCH_EVENT_FIELDS,
    TERMINAL_STATUSES,
    Batch,
    EventType,
    Job,
    JobStatus,
    Task,
    batch_payload,
    job_event_data,
)
from core.retention import retained_until
from core.schema import batches, jobs, results
from core.settings import Settings
from core.usage import Usage, record_usage
from core.webhooks import enqueue_event, enqueue_progress_event

DEFAULT_RESULT_TTL_S = Settings.result_ttl_s


def bucket_key(task: str, params: dict[str, Any]) -> str:
    """Jobs with equal keys can share one model call: task, decoder, output size, steps, cfg, guidance
    and step-cache threshold (named only when on, so keys of jobs without it stay as they were)."""
    if task == Task.UNDERSTAND:
        return f"understand|{params.get('max_new_tokens', 1024)}"
    decoder = params.get("decoder", "generation") if task == Task.EDIT else "generation"
    key = (
        f"{task}|{decoder}|{params['width']}x{params['height']}|{params['steps']}"
        f"|{_number(params['cfg_scale'])}|{_number(params['guidance'])}"
    )
    threshold = float(params.get("cache_threshold") or 0.0)
    return f"{key}|cache{_number(threshold)}" if threshold else key


def _number(value: float) -> str:
    """`3`, `3.5`: short like `:g`, but exact, so two different values never share a key (and a model
    call), as 3.0 and 3.0000001 did under `:g`; tests/test_contract.py holds keys to the model's."""
    short = f"{float(value):g}"
    return short if float(short) == float(value) else repr(float(value))


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


def _announce(conn: Connection, job: Job, event_type: EventType, *, complete_batch: bool = True) -> None:
    """Write the job's event to the outbox; complete its batch if this was the batch's last job."""
    enqueue_event(
        conn,
        tenant_id=job.tenant_id,
        event_type=event_type,
        data=job_event_data(job),
        url=job.webhook_url,
        events=job.webhook_events,
        job_id=job.id,
        batch_id=job.batch_id,
    )
    if job.batch_id is not None and complete_batch:
        maybe_complete_batch(conn, job.batch_id)


def maybe_complete_batch(conn: Connection, batch_id: str) -> bool:
    """Mark the batch completed once its last job ended, and announce it exactly once."""
    # Lock the batch row so two transactions ending the last two jobs cannot both miss the completion.
    conn.execute(select(batches.c.id).where(batches.c.id == batch_id).with_for_update())
    active = exists().where(jobs.c.batch_id == batch_id, jobs.c.status.in_(ACTIVE_STATUSES))
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
    batch = Batch.from_row(row)
    enqueue_event(
        conn,
        tenant_id=batch.tenant_id,
        event_type=EventType.BATCH_COMPLETED,
        data=batch_payload(
            batch, count_by_status(conn, batch_id), BATCH_EVENT_FIELDS, statuses=TERMINAL_STATUSES
        ),
        url=batch.webhook_url,
        events=batch.webhook_events,
        batch_id=batch_id,
    )
    return True


def count_by_status(conn: Connection, batch_id: str) -> dict[str, int]:
    """How many jobs of the batch are in each status (statuses without jobs are absent)."""
    rows = conn.execute(
        select(jobs.c.status, func.count()).where(jobs.c.batch_id == batch_id).group_by(jobs.c.status)
    ).all()
    return {status: int(n) for status, n in rows}


# The peek a claim starts from (the worker peeks, waits for batch mates, then claims with its head): the
# group the next claim takes, locking nothing. Its query is core.fair_share's, beside the claim's others.
peek_head = queue_head


def claim_batch(
    conn: Connection,
    *,
    worker_id: str,
    tasks: Sequence[str],
    max_batch: int,
    lease_s: float,
    bucket: str | None = None,
    head: Head | None = None,
    default_max_running: int = 0,
) -> list[Job]:
    """queued -> running for up to `max_batch` jobs of one bucket, exclusively, in fair-share order.

    The head's group goes first (the caller's `peek_head`, or a peek now); the bucket's other groups
    fill the batch. A tenant at its max_running (`default_max_running` unless set per tenant; 0: none)
    gets no more jobs started.
    """
    if head is None:
        head = peek_head(conn, tasks, bucket, max_running=default_max_running)
        if head is None:
            return []
    # A head from a peek knows whether its tenant has a limit: without one, nothing to count or lock.
    room = running_room(conn, {head.tenant_id}, default_max_running) if head.max_running != 0 else {}
    take = min(max_batch, room.get(head.tenant_id, max_batch))
    rows = _claim_group(conn, head, take, worker_id, lease_s) if take > 0 else []
    if len(rows) < max_batch:
        for group in fill_order(conn, head):
            if group.tenant_id not in room:  # a filler's tenant: never waited for (no lock-order cycles)
                room.update(running_room(conn, {group.tenant_id}, default_max_running, wait=False))
            take = min(max_batch - len(rows), room.get(group.tenant_id, max_batch))
            if take <= 0:
                continue
            # A filler's tenant keeps its turn, unless the head had nothing left to give.
            got = _claim_group(conn, group, take, worker_id, lease_s, turn=not rows)
            if group.tenant_id in room:
                room[group.tenant_id] -= len(got)
            rows += got
            if len(rows) >= max_batch:
                break
    return rows


@functools.cache
def _claim_statement(turn: bool) -> Select[Any]:
    """The statement of _claim_group, built once (bind parameters: group_slots, g_limit, worker_id,
    lease)."""
    # MATERIALIZED: evaluated once. As a plain IN (subquery) it may be re-run, and each run under
    # SKIP LOCKED finds other free rows: more than `limit` jobs.
    slots = group_slots()
    limit = bindparam("g_limit", type_=Integer)
    picked = oldest_ids(slots, limit).cte("picked").prefix_with("MATERIALIZED")
    claimed = (
        update(jobs)
        .where(jobs.c.id.in_(select(picked.c.id)), jobs.c.status == JobStatus.QUEUED)
        .values(
            status=JobStatus.RUNNING,
            stage="starting",
            step=None,
            attempt=jobs.c.attempt + 1,
            lease_owner=bindparam("worker_id", type_=String),
            lease_expires_at=func.now() + bindparam("lease", type_=Interval),
            started_at=func.coalesce(jobs.c.started_at, func.now()),
            updated_at=func.now(),
        )
        .returning(*jobs.c)
        .cte("claimed")
    )
    stmt = select(claimed).add_cte(log_claimed(claimed).cte("logged"))
    if turn:
        stmt = stmt.add_cte(turn_taken(slots, claimed).cte("turn"))
    return stmt


def _claim_group(
    conn: Connection, group: Group, limit: int, worker_id: str, lease_s: float, turn: bool = True
) -> list[Job]:
    """One statement: claim the group's oldest free jobs, log their new state and, if `turn`, record the
    tenant's turn."""
    values = {
        **group_values(group),
        "g_limit": limit,
        "worker_id": worker_id,
        "lease": timedelta(seconds=lease_s),
    }
    rows = conn.execute(_claim_statement(turn), values).mappings().all()
    return sorted((Job.from_row(r) for r in rows), key=lambda job: (job.created_at, job.id))


class Ack(enum.Enum):
    """What a worker learns when it reports on a job it runs."""

    OWNED = "owned"
    CANCEL_REQUESTED = "cancel_requested"
    LOST = "lost"  # the lease expired and the job was requeued or ended: stop and write nothing


def _owned(job_id: str, attempt: int) -> Any:
    return and_(jobs.c.id == job_id, jobs.c.status == JobStatus.RUNNING, jobs.c.attempt == attempt)


def _ended(status: JobStatus, stage: str | None = None, **extra: Any) -> dict[str, Any]:
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
        "status": JobStatus.QUEUED,
        "stage": JobStatus.QUEUED.value,
        "step": None,
        "lease_owner": None,
        "lease_expires_at": None,
        "enqueued_at": func.now(),
        "updated_at": func.now(),
        **extra,
    }


def _transition(conn: Connection, cond: Any, values: dict[str, Any]) -> list[Job]:
    """One conditional UPDATE of the jobs matching `cond`, their new states logged; returns them."""
    rows = conn.execute(update(jobs).where(cond).values(**values).returning(*jobs.c)).mappings().all()
    changed = [Job.from_row(row) for row in rows]
    log_states(conn, changed)
    return changed


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
    changed = _transition(conn, _owned(job_id, attempt), values)
    if not changed:
        return Ack.LOST
    job = changed[0]
    enqueue_progress_event(conn, job)  # only if asked for, at most every few seconds
    return Ack.CANCEL_REQUESTED if job.cancel_requested else Ack.OWNED


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
    result_ttl_s: float = DEFAULT_RESULT_TTL_S,
    usage: Usage | None = None,
) -> bool:
    """running -> succeeded with its result row and event; False if this attempt no longer owns the job.

    `result` holds the columns of the results table (kind, object_key, content_type, size_bytes, sha256,
    width, height, text); it is kept `result_ttl_s` (or the tenant's override) from now.
    """
    done = _transition(
        conn,
        _owned(job_id, attempt),
        _ended(JobStatus.SUCCEEDED, "done", progress=1.0, provenance=provenance),
    )
    if not done:
        return False
    expires_at = retained_until(done[0].tenant_id, result_ttl_s)
    conn.execute(results.insert().values(id=new_id("res"), job_id=job_id, expires_at=expires_at, **result))
    if usage is not None:
        record_usage(conn, done[0], usage)
    _announce(conn, done[0], EventType.JOB_SUCCEEDED)
    return True


def fail_job(
    conn: Connection,
    job_id: str,
    attempt: int | None,
    *,
    code: str,
    message: str,
    provenance: dict[str, Any] | None = None,
    usage: Usage | None = None,
) -> bool:
    """running (or queued, when attempt is None) -> failed with an error code; announce it (and record
    the worker's `usage` of it)."""
    cond = (
        _owned(job_id, attempt)
        if attempt is not None
        else and_(jobs.c.id == job_id, jobs.c.status.in_(ACTIVE_STATUSES))
    )
    values = _ended(JobStatus.FAILED, error_code=code, error_message=message[:4000])
    if provenance is not None:
        values["provenance"] = provenance
    failed = _transition(conn, cond, values)
    if not failed:
        return False
    if usage is not None:
        record_usage(conn, failed[0], usage)
    _announce(conn, failed[0], EventType.JOB_FAILED)
    return True


def requeue_job(conn: Connection, job_id: str, attempt: int, *, reason: str) -> bool:
    """running -> queued (transient error, batch split after OOM); the next claim counts a new attempt.

    A job whose cancel was requested ends `canceled` instead: claims skip such jobs, so requeued it
    would wait forever.
    """
    if _cancel_running(conn, and_(_owned(job_id, attempt), jobs.c.cancel_requested.is_(True))):
        return True
    values = _back_in_queue(error_message=reason[:4000], put_backs=jobs.c.put_backs + 1)
    return bool(_transition(conn, _owned(job_id, attempt), values))


def _cancel_running(conn: Connection, cond: Any) -> list[Job]:
    """running -> canceled for the jobs matching `cond`; announce each."""
    canceled = _transition(conn, cond, _ended(JobStatus.CANCELED))
    for job in canceled:
        _announce(conn, job, EventType.JOB_CANCELED)
    return canceled


def mark_canceled(conn: Connection, job_id: str, attempt: int, usage: Usage | None = None) -> bool:
    """running -> canceled, by the worker that stopped at a step boundary after a cancel request."""
    rows = _cancel_running(conn, _owned(job_id, attempt))
    if rows and usage is not None:
        record_usage(conn, rows[0], usage)
    return bool(rows)


def cancel_job(conn: Connection, tenant_id: str, job_id: str) -> Job | None:
    """Cancel a queued job at once, or ask a running one to stop; finished jobs are left as they are.

    Returns the job after the change, or None if the tenant has no such job.
    """
    queued = and_(jobs.c.id == job_id, jobs.c.tenant_id == tenant_id, jobs.c.status == JobStatus.QUEUED)
    canceled = _transition(conn, queued, _ended(JobStatus.CANCELED, cancel_requested=True))
    if canceled:
        _announce(conn, canceled[0], EventType.JOB_CANCELED)
        return canceled[0]
    conn.execute(
        update(jobs)
        .where(jobs.c.id == job_id, jobs.c.tenant_id == tenant_id, jobs.c.status == JobStatus.RUNNING)
        .values(cancel_requested=True, updated_at=func.now())
    )
    row = (
        conn.execute(select(*jobs.c).where(jobs.c.id == job_id, jobs.c.tenant_id == tenant_id))
        .mappings()
        .first()
    )
    return None if row is None else Job.from_row(row)


def cancel_batch(conn: Connection, tenant_id: str, batch_id: str) -> int | None:
    """Cancel every queued job of a batch and ask its running ones to stop; None if no such batch."""
    found = conn.execute(
        select(batches.c.id).where(batches.c.id == batch_id, batches.c.tenant_id == tenant_id)
    ).first()
    if found is None:
        return None
    canceled = _transition(
        conn,
        and_(jobs.c.batch_id == batch_id, jobs.c.status == JobStatus.QUEUED),
        _ended(JobStatus.CANCELED, cancel_requested=True),
    )
    conn.execute(
        update(jobs)
        .where(jobs.c.batch_id == batch_id, jobs.c.status == JobStatus.RUNNING)
        .values(cancel_requested=True, updated_at=func.now())
    )
    for job in canceled:  # the batch is completed once, below, not per job
        _announce(conn, job, EventType.JOB_CANCELED, complete_batch=False)
    conn.execute(update(batches).where(batches.c.id == batch_id).values(cancel_requested=True))
    maybe_complete_batch(conn, batch_id)
    return len(canceled)


def request_cancel_of_owner(conn: Connection, lease_owner: str) -> list[str]:
    """Ask every running job held under `lease_owner` (one batch task) to stop; returns their ids."""
    return list(
        conn.execute(
            update(jobs)
            .where(jobs.c.status == JobStatus.RUNNING, jobs.c.lease_owner == lease_owner)
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


def expire_leases(conn: Connection, *, max_attempts: int) -> tuple[list[Job], list[Job]]:
    """Requeue running jobs whose lease ran out; fail those whose worker was now lost `max_attempts` times.

    Only worker losses count toward poison: claims that ended in a transient put-back (requeue_job) do
    not. Returns (requeued jobs, failed jobs); the caller re-publishes wake-ups for the requeued ones.
    """
    expired = and_(jobs.c.status == JobStatus.RUNNING, jobs.c.lease_expires_at < func.now())
    # A job whose cancel was requested is not retried: it ends canceled (claims would skip it forever).
    _cancel_running(conn, and_(expired, jobs.c.cancel_requested.is_(True)))
    message = f"the job's worker was lost {max_attempts} times; not retried again"
    lost = jobs.c.worker_losses + 1
    failed = _transition(
        conn,
        and_(expired, jobs.c.worker_losses + 1 >= max_attempts),
        _ended(JobStatus.FAILED, error_code="poison_job", error_message=message, worker_losses=lost),
    )
    for job in failed:
        _announce(conn, job, EventType.JOB_FAILED)
    requeued = _transition(conn, expired, _back_in_queue(worker_losses=lost))
    return requeued, failed


def find_unclaimed_query(task: str, older_than_s: float, limit: int) -> Select[tuple[str, str, str]]:
    """The `limit` longest-waiting queued jobs of `task` past `older_than_s`: ix_jobs_queued_since order."""
    return (
        select(jobs.c.id, jobs.c.task, jobs.c.bucket)
        .where(
            jobs.c.status == JobStatus.QUEUED,
            jobs.c.task == task,
            jobs.c.enqueued_at < func.now() - timedelta(seconds=older_than_s),
        )
        .order_by(jobs.c.enqueued_at)
        .limit(limit)
    )


def find_unclaimed(conn: Connection, *, older_than_s: float, limit: int = 100) -> list[RowMapping]:
    """Queued jobs nobody claimed for `older_than_s` (a lost wake-up?): their ids, tasks and buckets.

    Per task, the longest-waiting jobs in ix_jobs_queued_since order: at most `limit` rows are read,
    whatever the depth, and none is locked or written, so a sweep never takes a job from a claim (one
    wake-up drains a whole task family, so the buckets of a few suffice).
    """
    found: list[RowMapping] = []
    for task in queued_tasks(conn):
        query = find_unclaimed_query(task, older_than_s, limit - len(found))
        found += conn.execute(query).mappings().all()
        if len(found) >= limit:
            break
    return found
