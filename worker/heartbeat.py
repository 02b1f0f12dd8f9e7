"""Lease keeping for the jobs a worker holds: a heartbeat thread, throttled progress, cancel and loss flags.

While the model runs, a thread extends the leases every `heartbeat_s` (core.jobs.heartbeat); progress
callbacks are buffered and written at most every `progress_interval_s` (every stage is kept, with its
latest step, so the job's event log shows each stage in order). Every answer from the database
updates two sets: jobs whose cancel was requested (the model drops them at the next step) and jobs that
are no longer ours (lease expired and taken over: the worker must write nothing for them).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from core import jobs as jobstate
from core.db import transaction
from core.jobs import Ack

log = logging.getLogger(__name__)

# Share of the job's progress reached at the start of each stage; denoising fills the space in between.
STAGE_PROGRESS = {"starting": 0.0, "encoding": 0.05, "denoising": 0.15, "decoding": 0.9, "uploading": 0.95}


def stage_progress(stage: str, step: int | None, total_steps: int | None) -> float:
    """Map a stage (and denoising step k of N) to a fraction in [0, 1]."""
    base = STAGE_PROGRESS.get(stage, 0.0)
    if stage == "denoising" and step is not None and total_steps:
        return base + (STAGE_PROGRESS["decoding"] - base) * min(step, total_steps) / total_steps
    return base


class LeaseKeeper:
    """Holds (job id -> attempt) claims between `start()` and `stop()`."""

    def __init__(
        self,
        engine: Engine,
        claims: dict[str, int],
        *,
        lease_s: float,
        heartbeat_s: float,
        progress_interval_s: float,
    ) -> None:
        self.engine = engine
        self.claims = dict(claims)
        self.lease_s = lease_s
        self.heartbeat_s = heartbeat_s
        self.progress_interval_s = progress_interval_s
        self.cancel_requested: set[str] = set()
        self.lost: set[str] = set()
        # per job, the stages not yet written: each stage kept (streams show every one), its latest step
        self._pending: dict[str, list[tuple[str, int | None, int | None]]] = {}
        self._last_flush = time.monotonic()  # the first write comes after one interval, for the whole batch
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="nexusgen-heartbeat", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.heartbeat_s + 5)

    # -- what the executor asks -------------------------------------------------------------------
    def should_stop(self, job_id: str) -> bool:
        """True when the job was canceled or is no longer ours: stop spending compute on it."""
        with self._lock:
            return job_id in self.cancel_requested or job_id in self.lost

    def is_lost(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self.lost

    def release(self, job_ids: Iterable[str]) -> None:
        """Stop heartbeating jobs that reached a final state."""
        with self._lock:
            for job_id in job_ids:
                self.claims.pop(job_id, None)
                self._pending.pop(job_id, None)

    def confirm(self, job_id: str, stage: str) -> Ack:
        """Record `stage` now, renewing the lease for a full `lease_s`, and return the job's Ack.

        Called right before a result is uploaded: an OWNED answer guarantees nobody else can take the
        job over for `lease_s`, so the upload and the completion cannot race another attempt.
        """
        attempt = self.claims.get(job_id)
        if attempt is None:
            return Ack.LOST
        self.flush()  # the stages before this one first, in order
        with transaction(self.engine) as conn:
            ack = jobstate.record_progress(
                conn,
                job_id,
                attempt,
                stage=stage,
                progress=stage_progress(stage, None, None),
                lease_s=self.lease_s,
            )
        self._note({job_id: ack})
        return ack

    # -- progress callbacks from the model ----------------------------------------------------------
    def progress(self, job_id: str, stage: str, step: int | None, total_steps: int | None) -> None:
        """Buffer the job's latest stage; write all buffered stages at most every progress_interval_s."""
        with self._lock:
            if job_id not in self.claims:
                return
            entries = self._pending.setdefault(job_id, [])
            if entries and entries[-1][0] == stage:
                entries[-1] = (stage, step, total_steps)  # a later step of the same stage
            else:
                entries.append((stage, step, total_steps))
            due = time.monotonic() - self._last_flush >= self.progress_interval_s
        if due:
            self.flush()

    def flush(self) -> None:
        """Write the buffered progress in one transaction; a database hiccup only delays it."""
        with self._lock:
            pending, self._pending = self._pending, {}
            # Rows are locked in job id order here and in _beat, so the two threads cannot deadlock.
            claims = {job_id: self.claims[job_id] for job_id in sorted(pending) if job_id in self.claims}
            self._last_flush = time.monotonic()
        if not claims:
            return
        acks: dict[str, Ack] = {}
        try:
            with transaction(self.engine) as conn:
                for job_id, attempt in claims.items():
                    for stage, step, total in pending[job_id]:
                        acks[job_id] = jobstate.record_progress(
                            conn,
                            job_id,
                            attempt,
                            stage=stage,
                            step=step,
                            total_steps=total,
                            progress=stage_progress(stage, step, total),
                            lease_s=self.lease_s,
                        )
        except DBAPIError as exc:  # progress is advisory; the lease and the result writes will tell
            log.warning("progress not recorded (%s); continuing", exc.orig or exc)
            return
        self._note(acks)

    # -- internals ------------------------------------------------------------------------------------
    def _note(self, acks: dict[str, Ack]) -> None:
        with self._lock:
            for job_id, ack in acks.items():
                if ack is Ack.CANCEL_REQUESTED:
                    self.cancel_requested.add(job_id)
                elif ack is Ack.LOST:
                    if job_id not in self.lost:
                        log.warning(
                            "job %s is no longer ours (lease lost); its result will be dropped", job_id
                        )
                    self.lost.add(job_id)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                claims = sorted((j, a) for j, a in self.claims.items() if j not in self.lost)
            if not claims:
                continue
            try:
                with transaction(self.engine) as conn:
                    acks = jobstate.heartbeat(conn, claims, self.lease_s)
            except DBAPIError as exc:  # the next beat tries again; the lease has slack for that
                log.warning("heartbeat failed (%s); retrying in %.1fs", exc.orig or exc, self.heartbeat_s)
                continue
            self._note(acks)
