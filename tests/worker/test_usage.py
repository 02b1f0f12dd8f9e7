"""Usage of a mixed batch run by a real worker: per-job records, their shares of each model call, and
GET /v1/usage, `nexusgen usage` and the /metrics counters all equal the sums of the records."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, select

from core.schema import jobs, usage_records
from core.settings import Settings
from nexusgen.cli import main as cli
from tests.support.api import new_tenant
from tests.support.api import upload as upload_image
from tests.worker.support import WorkerProcess, wait_for

COUNTERS = ("model_seconds", "images", "steps", "pixels", "input_tokens", "output_tokens")


@pytest.fixture(scope="module")
def cfg(settings: Settings) -> Settings:
    return settings.with_overrides(max_batch=4, batch_window_s=0.5, lease_s=30, heartbeat_s=0.5)


@pytest.fixture(scope="module")
def worker(cfg: Settings, start_worker: Callable[..., WorkerProcess]) -> WorkerProcess:
    return start_worker(cfg, "usage", preload=True)


def _sums(records: list[Any]) -> dict[str, Any]:
    return {"jobs": len(records), **{n: sum(r[n] for r in records) for n in COUNTERS}}


def test_usage_sums_equal_the_per_job_records_across_a_mixed_batch(
    engine: Engine, clean_db: Any, cfg: Settings, worker: WorkerProcess
) -> None:
    from api.app import create_app

    tenant = new_tenant(engine, "usage")
    client = create_app(cfg).test_client()
    auth = tenant.headers
    upload = upload_image(client, tenant).get_json()["id"]
    image = {"width": 256, "height": 256, "steps": 2}
    lines = [
        *({"custom_id": f"g{i}", "task": "generate", "prompt": f"fox {i}", "params": image}
          for i in range(3)),
        *({"custom_id": f"e{i}", "task": "edit", "instruction": "blue", "image": upload, "params": image}
          for i in range(2)),
        *({"custom_id": f"u{i}", "task": "understand", "instruction": "what is it?", "image": upload,
           "params": {"max_new_tokens": 6}} for i in range(2)),
    ]  # fmt: skip
    r = client.post(
        "/v1/batches",
        data="\n".join(json.dumps(line) for line in lines),
        headers={**auth, "Content-Type": "application/x-ndjson"},
    )
    assert r.status_code == 201, r.get_json()
    batch_id = r.get_json()["id"]
    with engine.connect() as conn:
        ids = conn.execute(select(jobs.c.id).where(jobs.c.batch_id == batch_id)).scalars().all()
    rows = wait_for(engine, ids, timeout_s=240)
    assert {r["status"] for r in rows.values()} == {"succeeded"}, worker.tail()

    with engine.connect() as conn:
        records = list(conn.execute(select(usage_records)).mappings())
    assert sorted(r["job_id"] for r in records) == sorted(ids)  # one record per finished job
    calls: dict[tuple[str, ...], list[Any]] = defaultdict(list)
    for rec in records:
        job = rows[rec["job_id"]]
        prov = job["provenance"]
        assert rec["task"] == job["task"] and rec["status"] == "succeeded" and rec["batch_id"] == batch_id
        # each stage: this job's share of its model call's stage time
        assert rec["stage_seconds"] and all(
            math.isclose(share, prov["timings"][f"{stage}_s"] / prov["batch_size"], abs_tol=1e-6)
            for stage, share in rec["stage_seconds"].items()
        )
        assert math.isclose(rec["model_seconds"], sum(rec["stage_seconds"].values()), abs_tol=1e-5)
        assert rec["input_tokens"] > 0 and rec["output_tokens"] > 0
        if job["task"] == "understand":
            assert (rec["images"], rec["pixels"], rec["steps"]) == (0, 0, 0)
            assert rec["output_tokens"] == prov["new_tokens"]
        else:
            assert (rec["images"], rec["pixels"], rec["steps"]) == (1, 256 * 256, 2)
        calls[tuple(sorted(f"{k}={v}" for k, v in prov["timings"].items() if k in (
            "ar_prefix_s", "ar_image_tokens_s", "conditioning_s", "denoise_s", "decode_s", "ar_decode_s")))
        ].append(rec)  # fmt: skip
    # the shares of one call add up to the call's time
    for stages, members in calls.items():
        call_s = sum(float(s.split("=")[1]) for s in stages)
        assert math.isclose(sum(m["model_seconds"] for m in members), call_s, rel_tol=1e-4, abs_tol=1e-5)

    by_task = client.get("/v1/usage?group_by=task", headers=auth).get_json()
    expected = {
        task: _sums([r for r in records if r["task"] == task]) for task in ("generate", "edit", "understand")
    }
    for row in by_task["data"]:
        want = expected[row.pop("task")]
        assert row.keys() == want.keys()
        assert all(math.isclose(row[k], want[k], abs_tol=1e-5) for k in want), (row, want)
    assert len(by_task["data"]) == 3 and by_task["total"]["jobs"] == 7
    by_day = client.get("/v1/usage?group_by=day", headers=auth).get_json()
    assert len(by_day["data"]) == 1 and by_day["data"][0]["jobs"] == 7
    total = _sums(records)
    assert all(math.isclose(by_day["total"][k], total[k], abs_tol=1e-5) for k in total)
    empty = client.get("/v1/usage?from=2020-01-01&to=2020-02-01", headers=auth).get_json()
    assert empty["data"] == [] and empty["total"]["jobs"] == 0
    assert client.get("/v1/usage?from=yesterday", headers=auth).status_code == 400

    cli_out = CliRunner(env={"DATABASE_URL": cfg.database_url}).invoke(
        cli, ["usage", "--tenant", "usage", "--group-by", "task"]
    )
    assert cli_out.exit_code == 0, cli_out.output
    assert all(math.isclose(json.loads(cli_out.output)["total"][k], total[k], abs_tol=1e-5) for k in total)

    metrics = {
        (s.name, s.labels.get("task")): s.value
        for family in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))
        for s in family.samples
        if s.labels.get("tenant") == "usage"
    }
    for task, want in expected.items():
        assert metrics[("nexusgen_tenant_jobs_total", task)] == want["jobs"]
        for name in COUNTERS:
            assert math.isclose(metrics[(f"nexusgen_tenant_{name}_total", task)], want[name], abs_tol=1e-5)
