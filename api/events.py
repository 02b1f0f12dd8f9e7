"""Live status streams (Server-Sent Events) of a job or a batch, resumable with Last-Event-ID.

A stream replays the job's logged states (core.events) after the client's last event id, then waits on
the process's EventHub: one thread that polls the newest event id (an index probe, a few times a second,
only while streams are open) and wakes the streams whose job or batch got events. An idle stream holds
its request thread but no database connection: each read is a short pooled transaction. Streams end at
the terminal state (a batch's when it completed), or after NEXUSGEN_EVENT_STREAM_MAX_S, when the client
reconnects with Last-Event-ID; at most NEXUSGEN_MAX_EVENT_STREAMS are open per process (503 beyond).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from apiflask import APIBlueprint, HTTPError
from flask import Response, request, stream_with_context
from sqlalchemy import Connection, Engine, RowMapping, select
from sqlalchemy.exc import SQLAlchemyError

from api.auth import auth, current_principal
from api.context import services
from api.errors import fail
from api.jobs import load_owned
from core.events import events_after, last_event_id, queue_position, queue_positions, touched_since
from core.records import Job, JobStatus
from core.schema import batches, jobs

bp = APIBlueprint("events", __name__, tag="Events")
log = logging.getLogger(__name__)

POLL_S = 0.25  # how often the hub looks for new events while streams are open
KEEPALIVE_S = 15.0  # a comment line this often: proxies keep the connection, a gone client is noticed
POSITION_EVERY_S = 5.0  # a queued job's position is recounted this often
RETRY_MS = 1000  # the reconnection delay the stream asks the client for
PAGE = 500  # events per read (core.events.events_after's default)
READ_SLOTS = 3  # stream reads at once per process (the pool is 5 + 10 overflow)
REREAD_EVERY = 4  # keep-alives between the reads that catch a wake-up the hub missed
REORDER_MARGIN = 200  # event ids the hub looks back (ids are taken at insert, commits come in any order)
BATCH_LAG_S = 2.0  # a live batch stream shows events this old: events of several jobs commit out of id order


class EventHub:
    """Wakes streams when their job or batch has new events, or a watched queued job's position moved.

    One thread per API process does every database read a waiting stream needs: the newest event id (an
    index probe) every POLL_S and, every POSITION_EVERY_S, the positions of the queued jobs streams
    watch (one statement for all of them, core.events.queue_positions). Idle streams read nothing.
    """

    def __init__(self, engine: Engine, max_streams: int, batch: int) -> None:
        self.engine = engine
        self.max_streams = max_streams
        self.batch = batch  # the jobs a claim takes: the position rule depends on it (core.events)
        self._lock = threading.Lock()
        self._waiters: dict[str, set[threading.Event]] = {}
        self._open = 0
        self._thread: threading.Thread | None = None
        self._seen = -1
        self._positions: dict[str, int] = {}  # queued job id -> its position when last counted
        self._counted_at = 0.0
        # Streams woken together (a job many watch moved) read one after another, a few at a time: they
        # never take more than READ_SLOTS of the pool, whatever their number.
        self.read_slots = threading.BoundedSemaphore(READ_SLOTS)

    def open(self) -> bool:
        """Count a new stream in; False when the process has its maximum open."""
        with self._lock:
            if self._open >= self.max_streams:
                return False
            self._open += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._poll, name="nexusgen-events", daemon=True)
                self._thread.start()
            return True

    def close(self) -> None:
        with self._lock:
            self._open -= 1

    def subscribe(self, key: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._waiters.setdefault(key, set()).add(event)
        return event

    def unsubscribe(self, key: str, event: threading.Event) -> None:
        with self._lock:
            waiting = self._waiters.get(key)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._waiters[key]

    def position(self, job_id: str) -> int | None:
        """The queued job's position as last counted by the hub (None: not counted yet)."""
        with self._lock:
            return self._positions.get(job_id)

    def _wake(self, keys: set[str]) -> None:
        with self._lock:
            woken = [e for key in keys for e in self._waiters.get(key, ())]
        for event in woken:
            event.set()

    def _count_positions(self, conn: Connection) -> set[str]:
        """Recount the positions of the queued jobs streams watch; return those that moved."""
        with self._lock:
            watched = sorted(k for k in self._waiters if k.startswith("job_"))
        counted = queue_positions(conn, watched, self.batch)
        with self._lock:
            moved = {
                k for k in set(counted) | set(self._positions) if counted.get(k) != self._positions.get(k)
            }
            self._positions = counted
        return moved

    def _poll(self) -> None:
        while True:
            with self._lock:
                if self._open <= 0:
                    self._thread = None
                    return
            recount = time.monotonic() - self._counted_at >= POSITION_EVERY_S
            try:
                with self.engine.connect() as conn:
                    newest = last_event_id(conn)
                    # a margin: transactions commit out of id order, a late one must still wake its stream
                    since = max(0, self._seen - REORDER_MARGIN)
                    touched = touched_since(conn, since, newest) if 0 <= self._seen < newest else set()
                    if recount:
                        touched |= self._count_positions(conn)
                        self._counted_at = time.monotonic()
            except SQLAlchemyError as exc:  # the streams' own reads report the outage; keep polling
                log.warning("event hub poll failed: %s", exc.__class__.__name__)
                time.sleep(1.0)
                continue
            self._seen = newest
            self._wake(touched)
            time.sleep(POLL_S)


_hub_lock = threading.Lock()


def hub() -> EventHub:
    """The EventHub of this app (one per process), made on the first stream."""
    svc = services()
    with _hub_lock:
        if svc.event_hub is None:
            svc.event_hub = EventHub(svc.engine, svc.settings.max_event_streams, svc.settings.max_batch)
        found: EventHub = svc.event_hub
    return found


def parse_last_event_id() -> tuple[int, int | None]:
    """(last logged event id, last queue position sent) from Last-Event-ID (or ?last_event_id=)."""
    raw = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or "0"
    logged, _, position = raw.partition(":q")
    try:
        return max(0, int(logged)), (int(position) if position else None)
    except ValueError:
        fail(400, "invalid_last_event_id", f"Last-Event-ID must be one this API sent, not {raw[:60]!r}")


def _sse(event: str, data: dict[str, Any], event_id: str | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


def _state(row: RowMapping) -> dict[str, Any]:
    return {
        "job_id": row["job_id"],
        "batch_id": row["batch_id"],
        "status": row["status"],
        "stage": row["stage"],
        "step": row["step"],
        "total_steps": row["total_steps"],
        "at": row["created_at"].isoformat(),
    }


def _stream(key: str, read: Any) -> Response:
    """The SSE response: `read(last, position)` gives (chunks, last, position, finished, wait_s)."""
    event_hub = hub()
    if not event_hub.open():
        raise HTTPError(
            503,
            "this API process has its maximum of event streams open; retry soon",
            headers={"Retry-After": "5"},
            extra_data={"code": "too_many_streams"},
        )
    last, position = parse_last_event_id()
    max_s = services().settings.event_stream_max_s

    def generate() -> Iterator[str]:
        wake = event_hub.subscribe(key)
        deadline = time.monotonic() + max_s
        try:
            yield f"retry: {RETRY_MS}\n\n"
            nonlocal last, position
            quiet = 0
            while True:
                wake.clear()
                with event_hub.read_slots:
                    chunks, last, position, finished, wait_s = read(last, position)
                yield from chunks
                if finished:
                    return
                # Wait for the hub; a keep-alive costs no read, and every few a read catches anything missed.
                while not wake.wait(min(wait_s, max(0.0, deadline - time.monotonic()) + 0.01)):
                    if time.monotonic() > deadline:
                        return  # the client reconnects with Last-Event-ID
                    if wait_s < KEEPALIVE_S:
                        break  # events were pending: read them now
                    yield ": keep-alive\n\n"
                    quiet += 1
                    if quiet % REREAD_EVERY == 0:
                        break
        finally:
            event_hub.unsubscribe(key, wake)
            event_hub.close()

    response = Response(stream_with_context(generate()), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response


@bp.get("/v1/jobs/<job_id>/events")
@bp.auth_required(auth, roles=["read"])
@bp.doc(
    responses={
        200: "text/event-stream: `state` events (status, stage, step, total_steps) in order, `queue` events "
        "(queue_position) while queued, then `end` at the terminal state. Resume with Last-Event-ID.",
        503: "The API process has its maximum of open streams.",
    }
)
def job_events(job_id: str) -> Response:
    """A job's live status as Server-Sent Events, from its first state (or after Last-Event-ID) to its end."""
    principal = current_principal()
    svc = services()
    with svc.engine.connect() as conn:
        load_owned(conn, jobs, "job", principal.tenant_id, job_id)

    event_hub = hub()

    def read(last: int, position: int | None) -> tuple[list[str], int, int | None, bool, float]:
        with svc.engine.connect() as conn:  # a short read: nothing is held while the stream waits
            job = Job.from_row(conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().one())
            logged = events_after(conn, last, job_id=job_id)
            now_at = None
            if job.status is JobStatus.QUEUED:  # the hub's count, or one of our own on the first read
                now_at = event_hub.position(job_id) or queue_position(conn, job, event_hub.batch)
        chunks = [_sse("state", _state(row), str(row["id"])) for row in logged]
        last = logged[-1]["id"] if logged else last
        if now_at is not None and now_at != position:
            position = now_at
            data = {"job_id": job_id, "status": "queued", "stage": job.stage, "queue_position": now_at}
            chunks.append(_sse("queue", data, f"{last}:q{now_at}"))
        finished = job.status.terminal and len(logged) < PAGE
        if finished:
            chunks.append(_sse("end", {"job_id": job_id, "status": job.status}))
        return chunks, last, position, finished, 0.0 if len(logged) == PAGE else KEEPALIVE_S

    return _stream(job_id, read)


@bp.get("/v1/batches/<batch_id>/events")
@bp.auth_required(auth, roles=["read"])
@bp.doc(
    responses={
        200: "text/event-stream: every job's `state` events in order, then `end` with the counts once the "
        "batch completed. Resume with Last-Event-ID.",
        503: "The API process has its maximum of open streams.",
    }
)
def batch_events(batch_id: str) -> Response:
    """A batch's live status as Server-Sent Events: each job's states, until the batch completed."""
    principal = current_principal()
    svc = services()
    with svc.engine.connect() as conn:
        load_owned(conn, batches, "batch", principal.tenant_id, batch_id)

    def read(last: int, position: int | None) -> tuple[list[str], int, int | None, bool, float]:
        with svc.engine.connect() as conn:
            completed = conn.execute(
                select(batches.c.completed_at).where(batches.c.id == batch_id)
            ).scalar_one()
            # Once completed, every job's transactions have committed: read all; before, lag behind.
            lag = 0.0 if completed is not None else BATCH_LAG_S
            logged = events_after(conn, last, batch_id=batch_id, older_than_s=lag)
            last = logged[-1]["id"] if logged else last
            pending = bool(lag) and bool(events_after(conn, last, batch_id=batch_id, limit=1))
        chunks = [_sse("state", _state(row), str(row["id"])) for row in logged]
        finished = completed is not None and len(logged) < PAGE
        if finished:
            chunks.append(_sse("end", {"batch_id": batch_id, "status": "completed"}))
        if len(logged) == PAGE:
            return chunks, last, position, False, 0.0  # more to read at once
        return chunks, last, position, finished, BATCH_LAG_S if pending else KEEPALIVE_S

    return _stream(batch_id, read)
