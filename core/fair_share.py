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
from typing import Any

from sqlalchemy import BindParameter, Connection, Select, and_, bindparam, exists, func, literal, select, text
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
    tenant and priority), how long its oldest job has waited and its tenant's max_running (0: none;
    None: not known)."""

    available: int = 0
    age_s: float = 0.0
    max_running: int | None = None


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


# The groups of a page of turns at the most urgent priority, with the age of each group's oldest job and
# what its bucket offers a batch, in turn order, then by age within a tenant. One statement per page:
# - `t`: tenants with queued jobs, from a rollup (`queue_tenants`, or job_counts' keys of one bucket: up to
#   150 keys at 50 tenants and 3 priorities), less those at their max_running (`full`, from job_counts'
#   running keys of the tenants that have a limit), so a lower priority runs while the urgent one's
#   tenants are all at their limit;
# - `urgent`: their turn order (`turn` 1 = served longest ago or never) at the most urgent priority;
# - `g`: the groups of the page's tenants (ix_job_counts_tenant), `available` per bucket (`queue_buckets`),
#   and each group's oldest job (one probe of ix_jobs_queue per group).
# So a peek sums a few hundred counter rows and probes a page's groups, however many jobs and keys wait.
_PEEK = """
    WITH full_tenants AS (
        SELECT r.tenant_id FROM tenants AS tn JOIN job_counts AS r ON r.tenant_id = tn.id
        WHERE r.status = 'running' AND coalesce(tn.max_running, :max_running) > 0
        GROUP BY r.tenant_id, tn.max_running HAVING sum(r.n) >= coalesce(tn.max_running, :max_running)
    ), t AS (
        SELECT task, priority, tenant_id FROM ({tenants}) AS k
        WHERE tenant_id NOT IN (SELECT tenant_id FROM full_tenants)
    ), urgent AS (
        SELECT t.task, t.tenant_id, t.priority, s.served_at,
               coalesce(tn.max_running, :max_running) AS max_running,
               dense_rank() OVER (ORDER BY s.served_at NULLS FIRST, t.tenant_id, t.task) AS turn
        FROM t LEFT JOIN tenant_turns AS s USING (task, tenant_id)
        LEFT JOIN tenants AS tn ON tn.id = t.tenant_id
        WHERE t.priority = (SELECT max(priority) FROM t)
    ), chosen AS (
        SELECT * FROM urgent WHERE turn BETWEEN :first AND :last
    ), g AS (
        SELECT c.task, c.bucket, c.priority, c.tenant_id, sum(c.n) AS queued
        FROM job_counts AS c JOIN chosen USING (task, tenant_id, priority)
        WHERE c.status = 'queued' {in_bucket}
        GROUP BY 1, 2, 3, 4 HAVING sum(c.n) > 0
    ), available AS (
        SELECT task, bucket, sum(n) AS available FROM queue_buckets
        WHERE (task, bucket) IN (SELECT task, bucket FROM g) GROUP BY 1, 2
    )
    SELECT g.task, g.bucket, g.priority, g.tenant_id, g.queued, chosen.served_at, a.available,
           extract(epoch FROM now() - h.enqueued_at) AS age_s, chosen.max_running, chosen.turn
    FROM g JOIN chosen USING (task, tenant_id, priority) JOIN available AS a USING (task, bucket)
    LEFT JOIN LATERAL (
        SELECT j.created_at, j.enqueued_at, j.id FROM jobs AS j
        WHERE j.status = 'queued' AND j.cancel_requested IS false AND j.task = g.task
          AND j.bucket = g.bucket AND j.priority = g.priority AND j.tenant_id = g.tenant_id
        ORDER BY j.created_at, j.id LIMIT 1
    ) AS h ON true
    ORDER BY chosen.turn, h.created_at, h.id
"""
_PEEK_ANY = text(
    _PEEK.format(
        tenants="SELECT task, priority, tenant_id FROM queue_tenants"
        " WHERE task = ANY(CAST(:tasks AS varchar[])) GROUP BY 1, 2, 3 HAVING sum(n) > 0",
        in_bucket="",
    )
)
_PEEK_IN_BUCKET = text(
    _PEEK.format(
        tenants="SELECT task, priority, tenant_id FROM job_counts WHERE status = 'queued'"
        " AND task = ANY(CAST(:tasks AS varchar[])) AND bucket = :bucket GROUP BY 1, 2, 3 HAVING sum(n) > 0",
        in_bucket="AND c.bucket = :bucket",
    )
)
# Turns read per statement: the first alone (a claim at depth needs no more), then a few at a time.
PAGES = (1, 4)


def urgent_heads(
    conn: Connection,
    tasks: Sequence[str],
    bucket: str | None,
    first: int,
    last: int,
    max_running: int = 0,
) -> list[tuple[int, Head | None]]:
    """(turn, group) for the turns `first`..`last` at the most urgent priority (tenants at their
    max_running, `max_running` unless set per tenant, passed over), in turn order, then oldest first;
    None for a group without a claimable job (claimed since it was counted)."""
    query = _PEEK_ANY if bucket is None else _PEEK_IN_BUCKET
    rows = conn.execute(
        query,
        {"tasks": list(tasks), "bucket": bucket, "first": first, "last": last, "max_running": max_running},
    ).all()
    return [
        (
            int(turn),
            None
            if age is None
            else Head(task, b, int(p), tenant, int(n), served, int(available), max(0.0, float(age)), limit),
        )
        for task, b, p, tenant, n, served, available, age, limit, turn in rows
    ]


def queue_head(
    conn: Connection,
    tasks: Sequence[str],
    bucket: str | None = None,
    *,
    full_at: int | None = None,
    window_s: float = 0.0,
    max_running: int = 0,
) -> Head | None:
    """The group the next claim of `tasks` (in `bucket` if given) takes, without locking anything.

    The tenant whose turn it is at the most urgent priority, and of its groups the one holding its
    oldest job; tenants at their max_running (`max_running` unless set per tenant; 0: none) are passed
    over. With `full_at`, a group is ready when its bucket offers that many jobs or its oldest job waited
    `window_s`; tenants with no ready group are passed over (they wait for batch mates), and if no group
    is ready the one that waited longest comes back, for the caller to wait on.
    """
    fallback: Head | None = None
    first, page = 1, 0
    while True:
        last = first + PAGES[min(page, len(PAGES) - 1)] - 1
        rows = urgent_heads(conn, tasks, bucket, first, last, max_running)
        if not rows:
            return fallback
        for _turn, head in rows:
            if head is None:
                continue
            if full_at is None or head.available >= full_at or head.age_s >= window_s:
                return head
            if fallback is None or head.age_s > fallback.age_s:
                fallback = head
        first, page = last + 1, page + 1


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


def group_slots() -> Group:
    """A Group of bind parameters (`group_values` gives a group's), for a statement built once and run for
    any group: building the claim statement anew took 7 ms of CPU per claim, its run 1 ms."""
    slot: Any = bindparam
    return Group(slot("g_task"), slot("g_bucket"), slot("g_priority"), slot("g_tenant_id"), 0)


def group_values(group: Group) -> dict[str, Any]:
    """The values of `group_slots` for `group`."""
    return {
        "g_task": group.task,
        "g_bucket": group.bucket,
        "g_priority": group.priority,
        "g_tenant_id": group.tenant_id,
    }


def _value(value: Any) -> Any:
    """A literal, or the bind parameter it already is (group_slots)."""
    return value if isinstance(value, BindParameter) else literal(value)


def oldest_ids(group: Group, limit: Any) -> Select[tuple[str]]:
    """Up to `limit` (a number or a bind parameter) of the group's oldest queued jobs, locked, skipping
    those other claims hold: one range of ix_jobs_queue."""
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
        select(_value(group.task), _value(group.tenant_id), func.clock_timestamp()).where(
            exists(select(claimed.c.id))
        ),
    )
    return stmt.on_conflict_do_update(
        index_elements=[tenant_turns.c.task, tenant_turns.c.tenant_id],
        set_={"served_at": stmt.excluded.served_at},
    )
