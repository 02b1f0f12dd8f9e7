"""The peek and claim of before the queue rollups (migration 0008), for bench_queue's side-by-side rows.

Before, a peek was three statements: the tenants at their max_running (a count over running jobs), the
groups of the most urgent priority (a sum over every queued key of job_counts: 3,000 at 50 tenants, 20
buckets and 3 priorities) and the heads of one tenant's groups; a claim added a look-up of the tenant's
limit and a second statement for the job events. Run on the same data as today's, in the same process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, text

from core.events import log_states
from core.fair_share import Head
from core.jobs import claim_batch

_SATURATED = text(
    """
    SELECT r.tenant_id FROM (SELECT tenant_id, count(*) AS n FROM jobs WHERE status = 'running'
        GROUP BY tenant_id) AS r
    JOIN tenants ON tenants.id = r.tenant_id
    WHERE coalesce(tenants.max_running, :max_running) > 0
      AND r.n >= coalesce(tenants.max_running, :max_running)
    """
)
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
TURNS_PER_READ = 4


def peek(
    conn: Connection,
    tasks: Sequence[str],
    bucket: str | None = None,
    *,
    full_at: int | None = None,
    window_s: float = 0.0,
) -> Head | None:
    """The old core.fair_share.queue_head with its caller's saturated-tenants query."""
    skip = set(conn.execute(_SATURATED, {"max_running": 0}).scalars())
    fallback: Head | None = None
    first = 1
    while True:
        params = {"tasks": list(tasks), "bucket": bucket, "first": first, "last": first + TURNS_PER_READ - 1}
        rows = conn.execute(_URGENT, params).all()
        if not rows:
            return fallback
        by_turn: dict[int, list[Head]] = {}
        for task, b, priority, tenant_id, queued, served_at, available, turn in rows:
            group = Head(task, b, int(priority), tenant_id, int(queued), served_at, int(available))
            by_turn.setdefault(int(turn), []).append(group)
        for groups in by_turn.values():
            if groups[0].tenant_id in skip:
                continue
            mine = {g.bucket: g for g in groups}
            g0 = groups[0]
            heads = conn.execute(
                _HEADS,
                {"buckets": list(mine), "task": g0.task, "priority": g0.priority, "tenant_id": g0.tenant_id},
            ).all()
            for head_bucket, age_s in heads:
                head = dataclasses.replace(mine[head_bucket], age_s=max(0.0, float(age_s)))
                if full_at is None or head.available >= full_at or head.age_s >= window_s:
                    return head
                if fallback is None or head.age_s > fallback.age_s:
                    fallback = head
        first += TURNS_PER_READ


def claim(conn: Connection, bucket: str, max_batch: int, worker_id: str, lease_s: float) -> list[Any]:
    """The old claim of a known bucket: the old peek, the tenant's limit looked up (max_running None),
    the claim, and the job events written again by a statement of their own, as they were."""
    head = peek(conn, ["generate"], bucket)
    if head is None:
        return []
    rows = claim_batch(
        conn, worker_id=worker_id, tasks=["generate"], max_batch=max_batch, lease_s=lease_s, head=head
    )
    log_states(conn, rows)
    return rows
