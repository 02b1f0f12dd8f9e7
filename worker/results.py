"""Store what a batch's model call gave each job: the result object, the result row, the final state and
its usage, in that order; a job whose lease was lost gets nothing written (worker.execute computes).
"""

from __future__ import annotations

import io
import logging
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, select

from core import jobs as jobstate
from core.db import transaction
from core.jobs import Ack
from core.records import JobStatus
from core.schema import jobs as jobs_table
from core.schema import results
from core.settings import Settings
from core.storage import Storage, result_key
from core.usage import Usage
from worker.heartbeat import LeaseKeeper

if TYPE_CHECKING:  # worker.execute imports torch; storing needs only the shapes of its outcomes
    from model.requests import RequestError
    from worker.execute import ComputedBatch, Outcome

log = logging.getLogger(__name__)

LOST = "lost"  # what happened to a job that is no longer ours: nothing was written


def provenance_of(outcome: Outcome, worker_id: str, extra_timings: dict[str, float]) -> dict[str, Any]:
    """The model's provenance plus what only the worker knows: batch size, worker, attempt, timings."""
    job = outcome.item.job
    prov = dict(outcome.result.provenance or {})
    prov.setdefault("params", dict(job.params))
    prov["task"] = job.task
    prov["bucket"] = job.bucket
    prov["batch_size"] = outcome.batch_size
    prov["worker"] = worker_id
    prov["attempt"] = outcome.item.attempt
    prov["timings"] = {**(prov.get("timings") or {}), **outcome.timings, **extra_timings}
    return prov


def encode_result(outcome: Outcome) -> tuple[str, bytes, str, dict[str, Any]]:
    """(file extension, bytes, content type, result columns) of a successful result."""
    res = outcome.result
    if res.image is not None:
        buf = io.BytesIO()
        res.image.save(buf, format="PNG")
        return (
            "png",
            buf.getvalue(),
            "image/png",
            {"kind": "image", "width": res.image.width, "height": res.image.height},
        )
    text = res.text or ""
    return "txt", text.encode("utf-8"), "text/plain; charset=utf-8", {"kind": "text", "text": text}


def store_outcome(
    engine: Engine,
    storage: Storage,
    keeper: LeaseKeeper,
    outcome: Outcome,
    worker_id: str,
    result_ttl_s: float = Settings.result_ttl_s,
) -> str:
    """Write one job's final state (and its result object); returns what happened to it.

    One of `succeeded`, `canceled`, `lost` (no longer ours: nothing written) or `failed: <error code>`.
    """
    job_id = outcome.item.job_id
    if keeper.is_lost(job_id):
        return LOST
    timings = {"input_s": round(outcome.item.input_s, 4)}
    if outcome.result.error is not None:
        return _store_failure(engine, outcome, outcome.result.error, worker_id, timings)
    if keeper.confirm(job_id, "uploading") is Ack.LOST:
        return LOST
    return _store_success(engine, storage, outcome, worker_id, timings, result_ttl_s)


def _store_failure(
    engine: Engine, outcome: Outcome, error: RequestError, worker_id: str, timings: dict[str, float]
) -> str:
    """End a job the model failed or canceled, with the usage it had consumed."""
    item = outcome.item
    usage = Usage.from_provenance(outcome.result.provenance, None)
    with transaction(engine) as conn:
        if error.code == "canceled":
            done = jobstate.mark_canceled(conn, item.job_id, item.attempt, usage=usage)
        else:
            done = jobstate.fail_job(
                conn,
                item.job_id,
                item.attempt,
                code=error.code,
                message=error.message,
                provenance=provenance_of(outcome, worker_id, timings),
                usage=usage,
            )
    if not done:
        return LOST
    if error.code == "canceled":
        return JobStatus.CANCELED.value
    return f"{JobStatus.FAILED.value}: {error.code}"


def _store_success(
    engine: Engine,
    storage: Storage,
    outcome: Outcome,
    worker_id: str,
    timings: dict[str, float],
    result_ttl_s: float,
) -> str:
    """1. upload the result object; 2. complete the job with its result row and usage; 3. if the
    completion was refused (the attempt is stale), drop the object when no result row points to it."""
    item, res = outcome.item, outcome.result
    started = time.monotonic()
    ext, data, content_type, columns = encode_result(outcome)
    key = result_key(item.job.tenant_id, item.job_id, ext)
    digest = storage.put_bytes(key, data, content_type)
    timings["upload_s"] = round(time.monotonic() - started, 4)
    result = {
        **columns,
        "object_key": key,
        "content_type": content_type,
        "size_bytes": len(data),
        "sha256": digest,
    }
    size = (res.image.width, res.image.height) if res.image else None
    with transaction(engine) as conn:
        done = jobstate.complete_job(
            conn,
            item.job_id,
            item.attempt,
            provenance=provenance_of(outcome, worker_id, timings),
            result=result,
            result_ttl_s=result_ttl_s,
            usage=Usage.from_provenance(res.provenance, size),
        )
    if not done:
        drop_stale_object(engine, storage, item.job_id, key)
        return LOST
    return JobStatus.SUCCEEDED.value


def drop_stale_object(engine: Engine, storage: Storage, job_id: str, key: str) -> None:
    """After a rejected completion, delete our upload if the job ended without a result.

    A job that is queued or running again gets the same key overwritten by its new attempt; one that
    succeeded elsewhere keeps its (same-key) object; only a job that ended without a result must not keep
    an object that no result row points to.
    """
    with engine.connect() as conn:
        status = conn.execute(
            select(jobs_table.c.status).where(jobs_table.c.id == job_id)
        ).scalar_one_or_none()
        has_result = conn.execute(select(results.c.id).where(results.c.job_id == job_id)).first() is not None
    log.warning("completion of job %s rejected (now %s); our attempt is stale", job_id, status)
    if status in (JobStatus.FAILED, JobStatus.CANCELED) and not has_result:
        storage.delete(key)


def store_batch(engine: Engine, storage: Storage, worker_id: str, batch: ComputedBatch) -> dict[str, str]:
    """Store every outcome of a computed batch and end its jobs; returns job id -> what happened."""
    ended = dict(batch.ended)
    try:
        for outcome in batch.outcomes:
            what = store_outcome(engine, storage, batch.keeper, outcome, worker_id, batch.result_ttl_s)
            batch.keeper.release([outcome.item.job_id])
            job = outcome.item.job
            log.info(
                "job %s %s",
                job.id,
                what,
                extra={"job_id": job.id, "batch_id": job.batch_id, "attempt": job.attempt},
            )
            ended[outcome.item.job_id] = what
    finally:
        batch.keeper.stop()
    log.info("batch of %d %s job(s) done: %s", batch.size, batch.task, ended)
    return ended
