"""Which queued jobs a claim takes: the most urgent priority first, then tenants in turn (round robin).

Within the most urgent priority that has queued jobs, the tenant served longest ago (or never) goes
first; a claim takes that tenant's oldest jobs of one bucket and fills the rest of the batch with the
bucket's other queued jobs (same priority first, tenants in turn order, then lower priorities). So a
tenant's single job waits for at most one batch per worker, whatever another tenant's backlog, and
compatible jobs still share a model call. Every query reads a bounded number of rows whatever the
depth: the counters of core.counts and index probes of ix_jobs_queue (one group's head in index order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, func, select, text
from sqlalchemy.dialects.postgresql import insert

from core.counts import Group, queued_groups
from core.schema import jobs, tenant_turns


@dataclass(frozen=True)
class Head:
    """The group a claim would take next, the jobs its bucket offers a batch, and its oldest job's wait."""

    task: str
    bucket: str
    priority: int
    tenant_id: str
    queued: int
    age_s: float


def _waiting() -> tuple[object, ...]:
    return (jobs.c.status == "queued", jobs.c.cancel_requested.is_(False))


# The oldest queued job of each of one tenant's buckets at one priority: one index probe per bucket.
_HEADS = text(
    """
    SELECT b.bucket, h.created_at, extract(epoch FROM now() - h.enqueued_at) AS age_s
    FROM unnest(CAST(:buckets AS varchar[])) AS b(bucket)
    CROSS JOIN LATERAL (
        SELECT created_at, enqueued_at, id FROM jobs
        WHERE status = 'queued' AND cancel_requested IS false AND task = :task AND bucket = b.bucket
          AND priority = :priority AND tenant_id = :tenant_id
        ORDER BY created_at, id LIMIT 1
    ) AS h
    ORDER BY h.created_at, h.id
    """
)


def _turns(conn: Connection, groups: Sequence[Group]) -> dict[tuple[str, str], datetime]:
    """When each (task, tenant) of `groups` was last served."""
    tenants = sorted({g.tenant_id for g in groups})
    c = tenant_turns.c
    rows = conn.execute(
        select(c.task, c.tenant_id, c.served_at).where(
            c.task.in_(sorted({g.task for g in groups})), c.tenant_id.in_(tenants)
        )
    ).all()
    return {(task, tenant): served for task, tenant, served in rows}


def _turn_order(groups: Sequence[Group], turns: dict[tuple[str, str], datetime]) -> list[tuple[str, str]]:
    """(task, tenant) pairs of `groups`, never served first, then served longest ago."""
    pairs = {(g.task, g.tenant_id) for g in groups}
    return sorted(pairs, key=lambda p: (p in turns, turns.get(p, datetime.min), p[1], p[0]))


def queue_head(
    conn: Connection,
    tasks: Sequence[str],
    bucket: str | None = None,
    *,
    full_at: int | None = None,
    window_s: float = 0.0,
) -> Head | None:
    """The group the next claim of `tasks` (in `bucket` if given) takes, without locking anything.

    With `full_at`, a group is ready when its bucket offers that many jobs or its oldest job waited
    `window_s`; tenants whose groups are not ready are passed over (they wait for batch mates), and if
    no group is ready the one that waited longest comes back, for the caller to wait on.
    """
    groups = queued_groups(conn, tasks, bucket)
    if not groups:
        return None
    available: dict[tuple[str, str], int] = {}
    for g in groups:
        available[(g.task, g.bucket)] = available.get((g.task, g.bucket), 0) + g.queued
    urgent = [g for g in groups if g.priority == groups[0].priority]
    fallback: Head | None = None
    for task, tenant_id in _turn_order(urgent, _turns(conn, urgent)):
        mine = [g.bucket for g in urgent if (g.task, g.tenant_id) == (task, tenant_id)]
        heads = conn.execute(
            _HEADS,
            {"buckets": mine, "task": task, "priority": urgent[0].priority, "tenant_id": tenant_id},
        ).all()
        for head_bucket, _, age_s in heads:
            head = Head(
                task,
                head_bucket,
                urgent[0].priority,
                tenant_id,
                available[(task, head_bucket)],
                max(0.0, float(age_s)),
            )
            if full_at is None or head.queued >= full_at or head.age_s >= window_s:
                return head
            if fallback is None or head.age_s > fallback.age_s:
                fallback = head
    return fallback


def _take(conn: Connection, group: Group | Head, limit: int) -> list[str]:
    """Lock up to `limit` of the group's oldest queued jobs, skipping those other claims hold."""
    return list(
        conn.execute(
            select(jobs.c.id)
            .where(
                *_waiting(),  # type: ignore[arg-type]
                jobs.c.task == group.task,
                jobs.c.bucket == group.bucket,
                jobs.c.priority == group.priority,
                jobs.c.tenant_id == group.tenant_id,
            )
            .order_by(jobs.c.created_at, jobs.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).scalars()
    )


def take_batch(
    conn: Connection,
    tasks: Sequence[str],
    max_batch: int,
    *,
    bucket: str | None = None,
    head: Head | None = None,
) -> list[str]:
    """Lock the ids of the next batch: `head`'s group (or the queue head's) first, then its bucket's
    other groups (priority, the head's tenant, then tenants in turn order). Returns [] if none is free."""
    if head is None:
        head = queue_head(conn, tasks, bucket)
        if head is None:
            return []
    ids = _take(conn, head, max_batch)
    if len(ids) < max_batch:
        others = [
            g
            for g in queued_groups(conn, [head.task], head.bucket)
            if (g.priority, g.tenant_id) != (head.priority, head.tenant_id)
        ]
        order = {pair: i for i, pair in enumerate(_turn_order(others, _turns(conn, others)))}
        others.sort(key=lambda g: (-g.priority, g.tenant_id != head.tenant_id, order[(g.task, g.tenant_id)]))
        for group in others:
            ids += _take(conn, group, max_batch - len(ids))
            if len(ids) >= max_batch:
                break
    return ids


def record_turn(conn: Connection, task: str, tenant_id: str) -> None:
    """The tenant was just served a batch of `task`: it goes to the back of the turn order."""
    stmt = insert(tenant_turns).values(task=task, tenant_id=tenant_id, served_at=func.clock_timestamp())
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[tenant_turns.c.task, tenant_turns.c.tenant_id],
            set_={"served_at": stmt.excluded.served_at},
        )
    )
