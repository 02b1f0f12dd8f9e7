"""The job event log against a real PostgreSQL: every transition appends its state; old events are purged;
queue positions follow the order claims take (priorities, then tenants in turn), exactly when few jobs
wait and within a stated bound at depth, at a cost that does not grow with depth."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, func, select, text, update

from core import jobs as sm
from core.events import EXACT_UP_TO, events_after, position_sql, purge_events, queue_position, queue_positions
from core.records import Job
from core.schema import job_events, jobs
from tests.core.test_fair_share import _claim, _queue
from tests.core.test_fair_share import _tenant as _named_tenant
from tests.core.test_jobs import _jobs, _tenant


def test_transitions_log_each_state_in_order_and_old_events_are_purged(engine: Engine, clean_db: Any) -> None:
    with engine.begin() as conn:
        tenant = _tenant(conn)
        (job_id,) = _jobs(conn, tenant, 1)
    with engine.begin() as conn:
        (job,) = sm.claim_batch(conn, worker_id="w", tasks=["generate"], max_batch=1, lease_s=60)
        sm.record_progress(conn, job_id, job.attempt, stage="encoding")
        sm.record_progress(conn, job_id, job.attempt, stage="denoising", step=1, total_steps=2)
        sm.complete_job(conn, job_id, job.attempt, provenance={}, result={"kind": "text", "text": "x"})
    with engine.connect() as conn:
        logged = events_after(conn, 0, job_id=job_id)
        assert [(e["status"], e["stage"], e["step"]) for e in logged] == [
            ("running", "starting", None),
            ("running", "encoding", None),
            ("running", "denoising", 1),
            ("succeeded", "done", 1),
        ]
        assert events_after(conn, logged[1]["id"], job_id=job_id) == logged[2:]
    with engine.begin() as conn:
        assert purge_events(conn, older_than_s=3600) == 0
        conn.execute(update(job_events).values(created_at=func.now() - func.make_interval(0, 0, 0, 2)))
        assert purge_events(conn, older_than_s=3600) == 4
        assert conn.execute(select(func.count()).select_from(job_events)).scalar_one() == 0


def test_queue_position_counts_the_jobs_that_run_first(engine: Engine, clean_db: Any) -> None:
    with engine.begin() as conn:
        tenant = _tenant(conn)
        first, second = _jobs(conn, tenant, 2)
        (urgent,) = _jobs(conn, tenant, 1, priority=5)
    with engine.connect() as conn:
        rows = {r["id"]: Job.from_row(r) for r in conn.execute(select(jobs)).mappings()}
        assert [queue_position(conn, rows[i], 8) for i in (urgent, first, second)] == [1, 2, 3]


def _claim_order(engine: Engine, batch: int) -> dict[str, int]:
    """Claim every queued job, `batch` at a time: {job id: 1 + the jobs claimed before it}."""
    order: list[str] = []
    while claimed := _claim(engine, max_batch=batch):
        order += claimed
    return {job_id: n for n, job_id in enumerate(order, 1)}


def test_position_of_a_small_queue_is_the_order_claims_take(clean_db: Engine) -> None:
    """Three tenants in one bucket, two priorities, full batches: each job's position before any claim
    equals its place in the order the claims then really take it (fair share included)."""
    with clean_db.begin() as conn:
        a, b, c = (_named_tenant(conn, name) for name in "abc")
        queued = _queue(conn, a, 12) + _queue(conn, b, 4) + _queue(conn, c, 8)
        queued += _queue(conn, c, 4, priority=5)
        queued += _queue(conn, b, 8)  # b's later jobs: behind its first four in its own order
    with clean_db.connect() as conn:
        estimated = queue_positions(conn, queued, 4)
    assert estimated == _claim_order(clean_db, 4)
    # Fair share, not age: b's 4 early jobs start before most of a's older 12.
    assert sorted(estimated.values()) == list(range(1, len(queued) + 1))


def test_position_at_depth_stays_within_its_bound_under_fair_share(clean_db: Engine) -> None:
    """Tenant a queues 5,000 jobs, then b 30: b's jobs are placed among a's by turns, a's deep jobs by
    the interpolated rank. Bound: a batch (a short batch is filled from the next tenant) plus, where the
    rank is interpolated, one bulk insert (1,000 jobs here: an insert's ids are made within a few ms, then
    its rows take far longer to write, so time is not even in rank; measured up to ~900)."""
    batch = 50
    with clean_db.begin() as conn:
        a, b = _named_tenant(conn, "a"), _named_tenant(conn, "b")
        deep = [job_id for _ in range(5) for job_id in _queue(conn, a, 1000)]
        few = _queue(conn, b, 30)
    with clean_db.connect() as conn:
        estimated = queue_positions(conn, deep + few, batch)
    real = _claim_order(clean_db, batch)
    assert len(real) == 5030
    worst = {True: 0, False: 0}  # exact own rank, interpolated own rank -> largest error
    for n, job_id in enumerate(deep):
        exact = n < EXACT_UP_TO or len(deep) - 1 - n < EXACT_UP_TO
        worst[exact] = max(worst[exact], abs(estimated[job_id] - real[job_id]))
    assert worst[True] <= batch and worst[False] <= batch + 1000, worst
    for job_id in few:  # b waits for one batch of a's, then takes turns: never behind a's backlog
        assert abs(estimated[job_id] - real[job_id]) <= batch
        assert real[job_id] <= 2 * batch + len(few)
    # the old count (priority then age) put b's first job at 5,001; it starts at 51
    assert estimated[few[0]] == real[few[0]] == batch + 1


def _pages(engine: Engine, job_id: str) -> tuple[int, str]:
    """Pages the position statement of one job touches (EXPLAIN ANALYZE, BUFFERS), and its plan."""
    sql = f"SELECT {position_sql(8)} FROM jobs WHERE jobs.id = :id"
    with engine.connect() as conn:
        plan = conn.execute(
            text(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}"), {"id": job_id}
        ).scalar_one()
        shown = conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS) {sql}"), {"id": job_id}).scalars()
    top = plan[0]["Plan"]
    return top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0), "\n".join(shown)


def test_position_reads_as_many_pages_at_50k_queued_as_at_2k(clean_db: Engine) -> None:
    """The job in the middle of its tenant's queue (the dearest case: both bounded ranges, two probes)."""
    pages = []
    with clean_db.begin() as conn:
        b = _named_tenant(conn, "b")
        _queue(conn, b, 500)
    for depth in (2_000, 50_000):
        with clean_db.begin() as conn:
            a = _named_tenant(conn, f"a{depth}")
            ids = [i for _ in range(max(1, depth // 10_000)) for i in _queue(conn, a, min(depth, 10_000))]
            conn.execute(text("ANALYZE jobs"))
        with clean_db.connect() as conn:  # b and the 2,000 go first (served never, names before)
            assert queue_positions(conn, [ids[-1]], 8) == {
                ids[-1]: depth + 500 + (2000 if depth > 2000 else 0)
            }
        _pages(clean_db, ids[len(ids) // 2])  # warm
        read, plan = _pages(clean_db, ids[len(ids) // 2])
        assert "Seq Scan on jobs" not in plan, plan
        pages.append(read)
    assert pages[1] <= 1.5 * pages[0] + 20, (pages, plan)
