"""max_running at claim time against a real PostgreSQL: a tenant at its limit is passed over, exactly."""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import Engine

from core import jobs as sm
from core.limits import set_limits
from tests.core.test_jobs import _jobs, _tenant


def _claim(conn: Any, default_max_running: int = 0, max_batch: int = 8) -> list[Any]:
    return sm.claim_batch(
        conn,
        worker_id="w",
        tasks=["generate"],
        max_batch=max_batch,
        lease_s=60,
        default_max_running=default_max_running,
    )


def test_a_tenant_at_max_running_is_passed_over(engine: Engine, clean_db: Any) -> None:
    with engine.begin() as conn:
        limited, free = _tenant(conn), _tenant(conn)
        set_limits(conn, limited, {"max_running": 2})
        limited_jobs = _jobs(conn, limited, 5)  # older: first in line
        free_jobs = _jobs(conn, free, 2)
    with engine.begin() as conn:
        first = _claim(conn)
    assert sorted(r.id for r in first) == sorted(limited_jobs[:2] + free_jobs)
    with engine.begin() as conn:
        assert _claim(conn) == []  # the limited tenant's other jobs wait, nothing else is queued
        done = first[0]
        assert sm.complete_job(conn, done.id, done.attempt, provenance={}, result={"kind": "text"})
    with engine.begin() as conn:
        assert [r.id for r in _claim(conn)] == [limited_jobs[2]]  # one slot came free
    with engine.begin() as conn:
        set_limits(conn, limited, {"max_running": 0})  # the admin lifts the limit
    with engine.begin() as conn:
        assert [r.id for r in _claim(conn)] == limited_jobs[3:]


def test_a_lower_priority_runs_while_the_urgent_tenants_are_at_their_limit(
    engine: Engine, clean_db: Any
) -> None:
    """The head skips tenants at max_running before it picks the priority: nothing else waits on them."""
    other_size = {"width": 256, "height": 256, "steps": 3, "cfg_scale": 3.0, "guidance": 3.5}
    with engine.begin() as conn:
        limited, free = _tenant(conn), _tenant(conn)
        set_limits(conn, limited, {"max_running": 1})
        urgent = _jobs(conn, limited, 3, priority=5)
        low = _jobs(conn, free, 2, params=other_size)  # another bucket: no filler of the urgent batch
    with engine.begin() as conn:
        assert [r.id for r in _claim(conn)] == urgent[:1]
    with engine.begin() as conn:
        assert sorted(r.id for r in _claim(conn)) == sorted(low)  # before: [] until the urgent job ended
        assert _claim(conn) == []


def test_the_default_applies_to_tenants_without_their_own(engine: Engine, clean_db: Any) -> None:
    with engine.begin() as conn:
        tenant, own = _tenant(conn), _tenant(conn)
        set_limits(conn, own, {"max_running": 3})
        ids = _jobs(conn, tenant, 3)
        own_ids = _jobs(conn, own, 4)
    with engine.begin() as conn:
        assert sorted(r.id for r in _claim(conn, default_max_running=1)) == sorted(ids[:1] + own_ids[:3])


def test_concurrent_claims_never_exceed_max_running(engine: Engine, clean_db: Any) -> None:
    with engine.begin() as conn:
        tenant = _tenant(conn)
        set_limits(conn, tenant, {"max_running": 3})
        _jobs(conn, tenant, 10)
    claimed: list[int] = []
    barrier = threading.Barrier(4)

    def claim() -> None:
        barrier.wait()
        with engine.begin() as conn:
            claimed.append(len(_claim(conn, max_batch=2)))

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(claimed) == 3, claimed
