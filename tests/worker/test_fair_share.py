"""Fair share with a real worker: one tenant's backlog does not hold up another tenant's single job."""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable

from sqlalchemy import Engine, select

from core.db import transaction
from core.ids import new_id
from core.ingest import insert_jobs
from core.jobs import bucket_key, cancel_batch
from core.schema import batches, jobs
from core.settings import Settings
from core.submit import JobDraft
from tests.worker.support import WorkerProcess, job_params, make_tenant, publish

BACKLOG = 2000
MAX_BATCH = 8


def _submit(engine: Engine, cfg: Settings, tenant_id: str, n: int, prompt: str) -> str:
    """n generation jobs through the bulk path (one batch, one COPY) and their wake-up; the batch id."""
    params = job_params("generate", steps=1, width=64, height=64, cfg_scale=1.0)  # tiny model work
    draft = JobDraft(task="generate", prompt=prompt, params=params, bucket=bucket_key("generate", params))
    batch_id = new_id("bat")
    with transaction(engine) as conn:
        conn.execute(batches.insert().values(id=batch_id, tenant_id=tenant_id, total_jobs=n))
        insert_jobs(conn, tenant_id, batch_id, [draft] * n)
    publish(cfg, [("generate", draft.bucket)])
    return batch_id


def _claims(engine: Engine, batch_id: str) -> list[tuple[float, int]]:
    """(claim time as epoch seconds, jobs) per claim of the batch's jobs so far, in claim order."""
    with engine.connect() as conn:
        started = conn.execute(
            select(jobs.c.started_at).where(jobs.c.batch_id == batch_id, jobs.c.started_at.is_not(None))
        ).scalars()
        per_claim: dict[float, int] = {}
        for at in started:
            per_claim[at.timestamp()] = per_claim.get(at.timestamp(), 0) + 1
    return sorted(per_claim.items())


def test_a_single_job_starts_within_two_batches_behind_a_2000_job_backlog(
    engine: Engine, tenant: str, settings: Settings, start_worker: Callable[..., WorkerProcess]
) -> None:
    cfg = settings.with_overrides(max_batch=MAX_BATCH, batch_window_s=0.2, lease_s=60)
    worker = start_worker(cfg, "fair", preload=True)
    other = make_tenant(engine)

    backlog = _submit(engine, cfg, tenant, BACKLOG, "a lighthouse")
    deadline = time.monotonic() + 120
    while len(_claims(engine, backlog)) < 2:  # the worker is busy with the backlog
        assert time.monotonic() < deadline, worker.tail()
        time.sleep(0.1)
    single = _submit(engine, cfg, other, 1, "a red bicycle")
    while not _claims(engine, single) or len(_claims(engine, backlog)) < 6:
        assert time.monotonic() < deadline, worker.tail()
        time.sleep(0.1)
    with transaction(engine) as conn:  # the rest of the backlog is not needed
        cancel_batch(conn, tenant, backlog)

    with engine.connect() as conn:
        submitted, started = conn.execute(
            select(jobs.c.created_at, jobs.c.started_at).where(jobs.c.batch_id == single)
        ).one()
    waited = (started - submitted).total_seconds()
    claims = _claims(engine, backlog)
    periods = [b[0] - a[0] for a, b in itertools.pairwise(claims)]
    batch_s = statistics.median(periods)
    print(f"fair share: the single job waited {waited:.2f} s; one batch takes {batch_s:.2f} s")
    assert waited <= 2 * batch_s + cfg.batch_window_s, (waited, batch_s, worker.tail())
    # The backlog still ran in full batches: 8 a claim, and 7 in the claim the single job rode in.
    (single_at,) = (at for at, _ in _claims(engine, single))
    sizes = [n + (1 if at == single_at else 0) for at, n in claims]
    assert sizes[:-1] == [MAX_BATCH] * (len(sizes) - 1), sizes  # the last claim may meet the cancel
    assert any(at == single_at for at, _ in claims)  # it shared its batch with the backlog
    with engine.connect() as conn:
        left = conn.execute(
            select(jobs.c.status).where(jobs.c.batch_id == backlog, jobs.c.status == "queued")
        ).all()
    assert left == []
