"""Claim order at the SQL level: priorities first, tenants in turn, full batches; counters stay exact."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, func, select, text, update

from core import jobs as sm
from core.counts import compact_counts, tally
from core.fair_share import queue_head, queued_groups
from core.ids import new_id
from core.ingest import insert_jobs
from core.schema import job_counts, jobs, queue_buckets, queue_tenants, tenants
from core.submit import JobDraft

PARAMS = {"width": 256, "height": 256, "steps": 2, "cfg_scale": 3.0, "guidance": 3.5, "seed": 1}
BUCKET = sm.bucket_key("generate", PARAMS)


def _tenant(conn: Any, name: str) -> str:
    tenant_id = new_id("ten")
    conn.execute(tenants.insert().values(id=tenant_id, name=name, webhook_secret="whsec_x"))
    return tenant_id


def _queue(conn: Any, tenant_id: str, n: int, *, priority: int = 0, steps: int = 2) -> list[str]:
    """Queue `n` jobs through the bulk path (COPY), as POST /v1/batches does."""
    params = dict(PARAMS, steps=steps)
    draft = JobDraft(
        task="generate",
        prompt="a cat",
        params=params,
        bucket=sm.bucket_key("generate", params),
        priority=priority,
    )
    insert_jobs(conn, tenant_id, None, [draft] * n)
    rows = conn.execute(
        select(jobs.c.id)
        .where(jobs.c.tenant_id == tenant_id, jobs.c.priority == priority, jobs.c.bucket == draft.bucket)
        .order_by(jobs.c.id.desc())
        .limit(n)
    ).scalars()
    return sorted(rows)


def _claim(engine: Engine, max_batch: int = 4, **kw: Any) -> list[str]:
    with engine.begin() as conn:
        rows = sm.claim_batch(conn, worker_id="w", tasks=["generate"], max_batch=max_batch, lease_s=60, **kw)
    return [r.id for r in rows]


def _owners(engine: Engine, ids: list[str]) -> list[str]:
    with engine.connect() as conn:
        owner = dict(
            conn.execute(
                select(jobs.c.id, tenants.c.name).join(tenants, tenants.c.id == jobs.c.tenant_id)
            ).all()
        )
    return [owner[i] for i in ids]


def test_tenants_take_turns_within_a_priority_and_fill_batches(clean_db: Engine) -> None:
    with clean_db.begin() as conn:
        a, b, c = (_tenant(conn, name) for name in "abc")
        a_jobs = _queue(conn, a, 20)
    with clean_db.begin() as conn:
        b_jobs = _queue(conn, b, 1)
        c_jobs = _queue(conn, c, 6)
    first = _claim(clean_db)
    # Nobody was served yet: tenant order; a's 4 oldest jobs make a full batch.
    assert first == a_jobs[:4]
    # b's single job goes next although a queued 20 first; the batch is filled from the bucket's other
    # tenants in turn order (c, never served, before a). Fillers do not use up their tenant's turn.
    assert _claim(clean_db) == [b_jobs[0], *c_jobs[:3]]
    assert _owners(clean_db, _claim(clean_db)) == ["c"] * 3 + ["a"]
    assert _owners(clean_db, _claim(clean_db)) == ["a"] * 4


def test_a_single_job_overtakes_a_backlog_and_rides_in_a_full_batch(clean_db: Engine) -> None:
    with clean_db.begin() as conn:
        a, b = _tenant(conn, "a"), _tenant(conn, "b")
        backlog = _queue(conn, a, 200)
    assert _claim(clean_db, max_batch=8) == backlog[:8]
    with clean_db.begin() as conn:
        (single,) = _queue(conn, b, 1)
    batch = _claim(clean_db, max_batch=8)
    assert batch == [single, *backlog[8:15]]  # b first, the batch still full with a's oldest
    assert _claim(clean_db, max_batch=8) == backlog[15:23]


def test_priorities_keep_their_meaning_across_tenants(clean_db: Engine) -> None:
    with clean_db.begin() as conn:
        a, b = _tenant(conn, "a"), _tenant(conn, "b")
        a_low = _queue(conn, a, 3)
        b_low = _queue(conn, b, 3)
        a_high = _queue(conn, a, 2, priority=5)
        b_other = _queue(conn, b, 1, priority=10, steps=3)
    assert _claim(clean_db) == b_other  # the most urgent job goes first, alone in its bucket
    # a is the only tenant at priority 5; lower priorities of the same bucket fill: a (its tenant), then b.
    assert _claim(clean_db) == [*a_high, *a_low[:2]]
    assert _owners(clean_db, _claim(clean_db)) == ["b", "b", "b", "a"]
    assert b_low and _claim(clean_db) == []


def test_peek_passes_over_young_partial_groups_and_waits_for_them_when_nothing_else(
    clean_db: Engine,
) -> None:
    with clean_db.begin() as conn:
        a, b = _tenant(conn, "a"), _tenant(conn, "b")
        _queue(conn, a, 9)
    _claim(clean_db, max_batch=1)  # a was served: b's turn comes first from now on
    with clean_db.begin() as conn:
        _queue(conn, b, 1, steps=3)  # alone in its bucket
    with clean_db.connect() as conn:
        head = queue_head(conn, ["generate"], full_at=8, window_s=60)
        assert head is not None and (head.tenant_id, head.available) == (a, 8)  # a full batch is ready
        head = queue_head(conn, ["generate"], full_at=8, window_s=0)  # b's job waited long enough
        assert head is not None and (head.tenant_id, head.available) == (b, 1)
    assert len(_claim(clean_db, max_batch=8, bucket=BUCKET)) == 8
    with clean_db.connect() as conn:
        head = queue_head(conn, ["generate"], full_at=8, window_s=60)
        assert head is not None and head.tenant_id == b and head.age_s < 60  # the caller waits on it


def test_concurrent_claims_across_tenants_take_each_job_once(clean_db: Engine) -> None:
    import threading

    with clean_db.begin() as conn:
        for name in "abcde":
            _queue(conn, _tenant(conn, name), 13)
    claimed: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        while rows := _claim(clean_db, max_batch=3):
            with lock:
                claimed.extend(rows)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 65 and len(set(claimed)) == 65


def _true_counts(engine: Engine) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str, int], int]]:
    with engine.connect() as conn:
        by_status = {
            (t, s): n
            for t, s, n in conn.execute(
                select(jobs.c.task, jobs.c.status, func.count()).group_by(jobs.c.task, jobs.c.status)
            )
        }
        depth = {
            (t, b, p): n
            for t, b, p, n in conn.execute(
                select(jobs.c.task, jobs.c.bucket, jobs.c.priority, func.count())
                .where(jobs.c.status == "queued")
                .group_by(jobs.c.task, jobs.c.bucket, jobs.c.priority)
            )
        }
    return by_status, depth


def test_counters_equal_a_count_of_the_rows_through_every_transition(clean_db: Engine) -> None:
    with clean_db.begin() as conn:
        a, b = _tenant(conn, "a"), _tenant(conn, "b")
        _queue(conn, a, 30)
        _queue(conn, b, 5, priority=3)
        a_other = _queue(conn, a, 4, steps=3)
    rows_claimed = []
    with clean_db.begin() as conn:
        rows_claimed = sm.claim_batch(conn, worker_id="w", tasks=["generate"], max_batch=8, lease_s=-1)
    with clean_db.begin() as conn:
        done = sm.claim_batch(conn, worker_id="w", tasks=["generate"], max_batch=2, lease_s=60)
        sm.complete_job(conn, done[0].id, 1, provenance={}, result={"kind": "text", "text": "t"})
        sm.fail_job(conn, done[1].id, 1, code="bad", message="m")
        sm.cancel_job(conn, a, a_other[0])
        sm.expire_leases(conn, max_attempts=3)  # the first claim's leases ran out: back in the queue
    with clean_db.begin() as conn:
        sm.fail_job(conn, a_other[1], None, code="bad", message="queued job failed")
        conn.execute(update(jobs).where(jobs.c.id == a_other[2]).values(priority=7))
        conn.execute(jobs.delete().where(jobs.c.id == a_other[3]))
    assert len(rows_claimed) == 8
    with clean_db.connect() as conn:
        assert tally(conn) == _true_counts(clean_db)
        assert _rollups(conn) == _true_rollups(conn)
    with clean_db.begin() as conn:
        rows_before = _counter_rows(conn)
        removed = compact_counts(conn)
    with clean_db.connect() as conn:
        rows_after = _counter_rows(conn)
        assert removed == sum(rows_before.values()) - sum(rows_after.values())
        assert all(rows_after[t] < rows_before[t] for t in ("job_counts", "queue_tenants", "queue_buckets"))
        assert tally(conn) == _true_counts(clean_db)
        assert _rollups(conn) == _true_rollups(conn)
        assert sum(g.queued for g in queued_groups(conn, ["generate"])) == 30 + 5 - 8 - 2 + 8 + 1


COUNTERS = (job_counts, queue_tenants, queue_buckets)


def _counter_rows(conn: Any) -> dict[str, int]:
    return {t.name: conn.execute(select(func.count()).select_from(t)).scalar_one() for t in COUNTERS}


def _rollups(conn: Any) -> tuple[dict[Any, int], dict[Any, int]]:
    """What the rollups say: queued jobs per (task, priority, tenant) and per (task, bucket)."""
    q, b = queue_tenants.c, queue_buckets.c
    per_tenant = conn.execute(
        select(q.task, q.priority, q.tenant_id, func.sum(q.n))
        .group_by(q.task, q.priority, q.tenant_id)
        .having(func.sum(q.n) != 0)
    )
    per_bucket = conn.execute(
        select(b.task, b.bucket, func.sum(b.n)).group_by(b.task, b.bucket).having(func.sum(b.n) != 0)
    )
    return {tuple(r[:-1]): r[-1] for r in per_tenant}, {tuple(r[:-1]): r[-1] for r in per_bucket}


def _true_rollups(conn: Any) -> tuple[dict[Any, int], dict[Any, int]]:
    """The same, counted over the job rows."""
    j, queued = jobs.c, jobs.c.status == "queued"
    per_tenant = conn.execute(
        select(j.task, j.priority, j.tenant_id, func.count())
        .where(queued)
        .group_by(j.task, j.priority, j.tenant_id)
    )
    per_bucket = conn.execute(select(j.task, j.bucket, func.count()).where(queued).group_by(j.task, j.bucket))
    return {tuple(r[:-1]): r[-1] for r in per_tenant}, {tuple(r[:-1]): r[-1] for r in per_bucket}


def test_claim_reads_an_index_range_of_its_group_not_the_tenants_history(clean_db: Engine) -> None:
    """The plan: one range of ix_jobs_queue, even for a tenant whose finished jobs outnumber its queue."""
    with clean_db.begin() as conn:
        a, b = _tenant(conn, "a"), _tenant(conn, "b")
        _queue(conn, a, 5000)
        conn.execute(update(jobs).where(jobs.c.tenant_id == a).values(status="succeeded"))
        _queue(conn, a, 10)
        for steps in range(2, 12):
            _queue(conn, b, 300, steps=steps)
        conn.execute(text("ANALYZE jobs"))
    with clean_db.begin() as conn:
        head = queue_head(conn, ["generate"])
        assert head is not None and head.tenant_id == a
        plan = "\n".join(
            conn.execute(
                text(
                    "EXPLAIN (ANALYZE, BUFFERS) SELECT id FROM jobs WHERE status = 'queued'"
                    " AND cancel_requested IS false AND task = :t AND bucket = :b AND priority = :p"
                    " AND tenant_id = :tenant ORDER BY created_at, id LIMIT 8 FOR UPDATE SKIP LOCKED"
                ),
                {"t": head.task, "b": head.bucket, "p": head.priority, "tenant": head.tenant_id},
            ).scalars()
        )
    assert "ix_jobs_queue" in plan and "Sort" not in plan and "Seq Scan" not in plan, plan
