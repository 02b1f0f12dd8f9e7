"""Which queued jobs a claim takes: the most urgent priority first, then tenants in turn (round robin).

Within the most urgent priority that has queued jobs, the tenant served longest ago (or never) goes
first; a claim takes that tenant's oldest jobs of one bucket and fills the rest of the batch with the
bucket's other queued jobs (same priority first, tenants in turn order, then lower priorities). So a
tenant's single job waits for at most one batch per worker, whatever another tenant's backlog, and
compatible jobs still share a model call. Every query reads a bounded number of rows whatever the
depth: the counters of core.counts and index probes of ix_jobs_queue (one group's head in index order).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Select, and_, exists, func, literal, select, text
from sqlalchemy.dialects.postgresql import Insert, insert

from core.schema import job_counts, jobs, tenant_turns


@dataclass(frozen=True)
class Group:
    """Queued jobs of one tenant that a claim takes together (same task, bucket and priority), with
    how many there are and when the tenant was last served a batch of the task (None: never)."""

    task: str
    bucket: str
    priority: int
    tenant_id: str
    queued: int
    served_at: datetime | None = None


@dataclass(frozen=True)
class Head(Group):
    """The group a claim would take next, with the jobs its bucket offers a batch (`available`, every
    tenant and priority) and how long its oldest job has waited."""

    available: int = 0
    age_s: float = 0.0


def queued_groups(conn: Connection, tasks: Sequence[str], bucket: str | None = None) -> list[Group]:
    """Every (task, bucket, priority, tenant) with queued jobs, from the counters: most urgent priority
    first, then turn order (never served, then served longest ago)."""
    c, t = job_counts.c, tenant_turns.c
    q = select(c.task, c.bucket, c.priority, c.tenant_id, func.sum(c.n).label("queued")).where(
        c.status == "queued", c.task.in_(list(tasks))
    )
    if bucket is not None:
        q = q.where(c.bucket == bucket)
    counted = q.group_by(c.task, c.bucket, c.priority, c.tenant_id).having(func.sum(c.n) > 0).subquery()
    rows = conn.execute(
        select(counted, t.served_at)
        .select_from(
            counted.outerjoin(
                tenant_turns, and_(t.task == counted.c.task, t.tenant_id == counted.c.tenant_id)
            )
        )
        .order_by(
            counted.c.priority.desc(),
            t.served_at.asc().nulls_first(),
            counted.c.tenant_id,
            counted.c.task,
            counted.c.bucket,
        )
    ).all()
    return [Group(task, b, int(p), tenant, int(n), served) for task, b, p, tenant, n, served in rows]


# The oldest queued job of each of one tenant's buckets at one priority: one index probe per bucket.
_HEADS = text(
    """
    SELECT b.bucket, extract(epoch FROM now() - h.enqueued_at) AS age_s
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


# The groups at the most urgent priority with queued jobs, in turn order (`turn` 1 = the tenant served
# longest ago or never), with what their bucket offers a batch; `turn` between :first and :last only, so a
# peek reads a few tenants' groups however many tenants wait.
_URGENT = text(
    """
    WITH g AS (
        SELECT task, bucket, priority, tenant_id, sum(n) AS queued FROM job_counts
        WHERE status = 'queued' AND task = ANY(CAST(:tasks AS varchar[]))
          AND (CAST(:bucket AS varchar) IS NULL OR bucket = :bucket)
        GROUP BY 1, 2, 3, 4 HAVING sum(n) > 0
    ), available AS (
        SELECT task, bucket, sum(queued) AS available FROM g GROUP BY 1, 2
    ), urgent AS (
        SELECT g.*, a.available, t.served_at,
               dense_rank() OVER (ORDER BY t.served_at NULLS FIRST, g.tenant_id, g.task) AS turn
        FROM g JOIN available AS a USING (task, bucket)
        LEFT JOIN tenant_turns AS t USING (task, tenant_id)
        WHERE g.priority = (SELECT max(priority) FROM g)
    )
    SELECT task, bucket, priority, tenant_id, queued, served_at, available, turn FROM urgent
    WHERE turn BETWEEN :first AND :last ORDER BY turn, bucket
    """
)
TURNS_PER_READ = 4


def queue_head(
    conn: Connection,
    tasks: Sequence[str],
    bucket: str | None = None,
    *,
    full_at: int | None = None,
    window_s: float = 0.0,
) -> Head | None:
    """The group the next claim of `tasks` (in `bucket` if given) takes, without locking anything.

    The tenant whose turn it is at the most urgent priority, and of its groups the one holding its
    oldest job. With `full_at`, a group is ready when its bucket offers that many jobs or its oldest job
    waited `window_s`; tenants with no ready group are passed over (they wait for batch mates), and if
    no group is ready the one that waited longest comes back, for the caller to wait on.
    """
    fallback: Head | None = None
    first = 1
    while True:
        rows = conn.execute(
            _URGENT,
            {"tasks": list(tasks), "bucket": bucket, "first": first, "last": first + TURNS_PER_READ - 1},
        ).all()
        if not rows:
            return fallback
        by_turn: dict[int, list[Head]] = {}
        for task, b, priority, tenant_id, queued, served_at, available, turn in rows:
            group = Head(task, b, int(priority), tenant_id, int(queued), served_at, int(available))
            by_turn.setdefault(int(turn), []).append(group)
        for groups in by_turn.values():
            mine = {g.bucket: g for g in groups}
            heads = conn.execute(
                _HEADS,
                {
                    "buckets": list(mine),
                    "task": groups[0].task,
                    "priority": groups[0].priority,
                    "tenant_id": groups[0].tenant_id,
                },
            ).all()
            for head_bucket, age_s in heads:
                head = dataclasses.replace(mine[head_bucket], age_s=max(0.0, float(age_s)))
                if full_at is None or head.available >= full_at or head.age_s >= window_s:
                    return head
                if fallback is None or head.age_s > fallback.age_s:
                    fallback = head
        first += TURNS_PER_READ


def fill_order(conn: Connection, head: Group) -> list[Group]:
    """The other groups of the head's bucket, in the order they fill a batch: most urgent priority
    first, at one priority the head's tenant first, then the other tenants in turn order."""
    others = [
        g
        for g in queued_groups(conn, [head.task], head.bucket)
        if (g.priority, g.tenant_id) != (head.priority, head.tenant_id)
    ]
    # queued_groups gives turn order within a priority; a stable sort keeps it.
    return sorted(others, key=lambda g: (-g.priority, g.tenant_id != head.tenant_id))


def oldest_ids(group: Group, limit: int) -> Select[tuple[str]]:
    """Up to `limit` of the group's oldest queued jobs, locked, skipping those other claims hold:
    one range of ix_jobs_queue."""
    return (
        select(jobs.c.id)
        .where(
            jobs.c.status == "queued",
            jobs.c.cancel_requested.is_(False),
            jobs.c.task == group.task,
            jobs.c.bucket == group.bucket,
            jobs.c.priority == group.priority,
            jobs.c.tenant_id == group.tenant_id,
        )
        .order_by(jobs.c.created_at, jobs.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def turn_taken(group: Group, claimed: Any) -> Insert:
    """Record that the group's tenant was served (it goes to the back of the turn order), if `claimed`
    (a statement's CTE of claimed rows) holds any row."""
    stmt = insert(tenant_turns).from_select(
        ["task", "tenant_id", "served_at"],
        select(literal(group.task), literal(group.tenant_id), func.clock_timestamp()).where(
            exists(select(claimed.c.id))
        ),
    )
    return stmt.on_conflict_do_update(
        index_elements=[tenant_turns.c.task, tenant_turns.c.tenant_id],
        set_={"served_at": stmt.excluded.served_at},
    )
