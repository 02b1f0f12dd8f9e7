"""Revoking a running batch task (Flower's Revoke button) cancels its jobs, as the API's cancel does.

Celery's own `revoke` only stops a task that has not started yet. This wraps it: for each revoked task
this worker is running, the batch's jobs get `cancel_requested` in Postgres, and the batch drops them at
its next denoising step (and ends them `canceled`). With terminate, Celery kills the pool process as well;
the requested cancel then ends the jobs `canceled` when the sweeper finds their leases expired.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker import control, state

from core.db import transaction
from core.jobs import request_cancel_of_owner
from core.queue import TASK_RUN_BATCH
from worker.runtime import TRANSIENT_ERRORS

log = logging.getLogger(__name__)

_celery_revoke = control.Panel.data["revoke"]


def cancel_revoked_batches(panel: Any, task_ids: set[str]) -> int:
    """Request the cancel of every job of the revoked batch tasks running here; returns how many."""
    canceled = 0
    for request in list(state.active_requests):
        if request.id not in task_ids or request.name != TASK_RUN_BATCH or not request.worker_pid:
            continue
        owner = f"{panel.hostname}/{request.worker_pid}/{request.id}"
        try:
            with transaction(panel.app.engine) as conn:
                job_ids = request_cancel_of_owner(conn, owner)
        except TRANSIENT_ERRORS as exc:
            log.warning("revoke of %s: cancel not recorded (%s)", request.id, exc.__class__.__name__)
            continue
        log.info("revoke of batch task %s: cancel requested for %s", request.id, ", ".join(job_ids))
        canceled += len(job_ids)
    return canceled


@control.control_command(variadic="task_id", signature="[id1 [id2 [... [idN]]]]")
def revoke(panel: Any, task_id: Any, terminate: bool = False, signal: Any = None, **kwargs: Any) -> Any:
    """Revoke task by task id (or list of ids); a running batch task's jobs are canceled."""
    ids = set(task_id if isinstance(task_id, list | tuple | set) else [task_id])
    canceled = cancel_revoked_batches(panel, ids)  # before terminate ends the requests
    reply = _celery_revoke(panel, task_id, terminate=terminate, signal=signal, **kwargs)
    if canceled and isinstance(reply, dict) and "ok" in reply:
        reply["ok"] = f"{reply['ok']}; cancel requested for {canceled} job(s)"
    return reply
