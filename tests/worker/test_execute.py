"""The executor's failure handling: OOM halves the batch, a model error fails one job, outages requeue."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from sqlalchemy import Engine

from core.db import transaction
from core.jobs import claim_batch
from core.records import Job
from core.schema import jobs
from core.settings import Settings
from model.requests import GenerateRequest, RequestError, Result
from tests.worker.support import insert_job, job_rows
from worker.app import make_celery
from worker.execute import Item, run_model
from worker.heartbeat import LeaseKeeper
from worker.runtime import TRANSIENT_ERRORS
from worker.tasks import claim_and_run


class PickyModel:
    """Stands in for NexusGen where the real one cannot fail on demand: OOM above a batch size, or a
    crash whenever a given prompt is in the batch."""

    def __init__(self, max_ok: int = 100, poison: str | None = None) -> None:
        self.max_ok, self.poison, self.calls = max_ok, poison, []

    def generate(self, requests: Sequence[GenerateRequest], **_: Any) -> list[Result]:
        self.calls.append(len(requests))
        if len(requests) > self.max_ok:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        if any(r.prompt == self.poison for r in requests):
            raise RuntimeError("shape mismatch (simulated)")
        return [Result(text=r.prompt, provenance={"seed": r.seed}) for r in requests]


def items(n: int) -> list[Item]:
    blank = dict.fromkeys(jobs.c.keys())
    rows = [
        {**blank, "id": f"job_{i}", "attempt": 1, "task": "generate", "status": "running", "bucket": "b"}
        for i in range(n)
    ]
    return [Item(Job.from_row(row), GenerateRequest(prompt=f"p{i}", seed=i)) for i, row in enumerate(rows)]


@pytest.fixture
def keeper(engine: Engine) -> LeaseKeeper:
    return LeaseKeeper(engine, {}, lease_s=60, heartbeat_s=60, progress_interval_s=1)


def test_out_of_memory_halves_the_batch_until_it_fits(keeper: LeaseKeeper) -> None:
    model = PickyModel(max_ok=2)
    outcomes = run_model(model, "generate", items(5), keeper)  # type: ignore[arg-type]
    assert [o.result.text for o in outcomes] == [f"p{i}" for i in range(5)]  # all done, in order
    assert [o.batch_size for o in outcomes] == [2, 2, 1, 2, 2]
    assert model.calls == [5, 2, 3, 1, 2]


def test_out_of_memory_at_batch_one_fails_the_job(keeper: LeaseKeeper) -> None:
    outcomes = run_model(PickyModel(max_ok=0), "generate", items(2), keeper)  # type: ignore[arg-type]
    assert [o.result.error.code for o in outcomes if o.result.error] == ["out_of_memory"] * 2


def test_model_error_fails_only_the_job_that_causes_it(keeper: LeaseKeeper) -> None:
    outcomes = run_model(PickyModel(poison="p2"), "generate", items(4), keeper)  # type: ignore[arg-type]
    errors = {o.item.job_id: o.result.error for o in outcomes if o.result.error}
    assert list(errors) == ["job_2"]
    assert isinstance(errors["job_2"], RequestError) and errors["job_2"].code == "model_error"
    assert "shape mismatch" in errors["job_2"].message
    assert [o.result.text for o in outcomes if not o.result.error] == ["p0", "p1", "p3"]


def test_storage_outage_puts_the_batch_back_for_a_retry(
    engine: Engine, tenant: str, settings: Settings
) -> None:
    # Nothing listens on port 9: every S3 call fails to connect, as during an outage.
    down = settings.with_overrides(
        s3_endpoint_url="http://127.0.0.1:9", batch_window_s=0.0, tasks=("generate",)
    )
    ids = [insert_job(engine, tenant, "generate", f"p{i}")[0] for i in range(2)]
    with pytest.raises(TRANSIENT_ERRORS):
        claim_and_run(make_celery(down), "generate", None, "w/1/task")
    rows = job_rows(engine, ids)
    assert {(r["status"], r["attempt"]) for r in rows.values()} == {("queued", 1)}
    assert all("transient error" in r["error_message"] for r in rows.values())
    with transaction(engine) as conn:  # and the next claim takes them again
        again = claim_batch(conn, worker_id="w", tasks=["generate"], max_batch=4, lease_s=60)
    assert sorted(r.id for r in again) == sorted(ids)


def test_worker_serves_only_its_task_families(engine: Engine, tenant: str, settings: Settings) -> None:
    only_understand = settings.with_overrides(tasks=("understand",), batch_window_s=0.0)
    job, _ = insert_job(engine, tenant, "generate")
    assert claim_and_run(make_celery(only_understand), "generate", None, "w/1/task")["size"] == 0
    assert job_rows(engine, [job])[job]["status"] == "queued"
