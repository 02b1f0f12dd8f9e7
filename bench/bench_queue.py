"""The queue at depth: claim, peek, sweep and /metrics latency and JSONL ingestion at 10k/100k/1M queued.

Starts embedded Postgres, Redis and S3 and the real API under gunicorn, makes 50 tenants, and fills the
queue through the bulk path (10,000-line JSONL POSTs to /v1/batches, each from one tenant, lines spread
over 20 buckets and 3 priorities). At each depth it times: a claim of 8 jobs of a known bucket
(core.jobs.claim_batch, committed; the claimed jobs are put back afterwards, untimed), the worker's
head-of-queue peek across buckets (core.jobs.peek_head), each beside the same done with the queries of
before the queue rollups (bench.queue_before, taking turns on the same data), the sweep's queries
(worker.sweeper.sweep_database) and a whole sweep with its wake-ups to the broker (worker.sweeper.sweep), one
GET /metrics, the read behind GET /v1/jobs/{id} of random queued jobs (core.job_view, beside the
statement of before the position rule, bench.position_before), and reports the ingestion rate of the
fill POSTs that reached the depth. Before timing, it runs ANALYZE (what autovacuum does within a minute
of a bulk load) and one sweep (which folds the counters' delta rows, as beat does every 15 s).
Run: `python -m bench.bench_queue [--depths 10000,100000,1000000]`; writes bench/results/queue.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx

from bench.bench_get import percentile
from bench.common import explain, inline_sql, plans_table, table, write_result
from bench.services import bench_root, start_gunicorn, start_services, stop_all

TENANTS = 50
SIZES = ((256, 256), (512, 512), (768, 768), (1024, 1024))
STEPS = (10, 20, 30, 40, 50)  # 4 sizes x 5 step counts = 20 buckets
PRIORITIES = (0, 1, 2)
LINES = 10_000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="10000,100000,1000000", help="queued jobs at each measurement")
    parser.add_argument("--samples", type=int, default=100, help="timed claims and peeks per depth")
    parser.add_argument("--scrapes", type=int, default=20, help="timed sweeps and /metrics scrapes per depth")
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also run the API of git revision REF on the same servers; the fill POSTs take turns between "
        "the two, and each one's ingestion rate is reported",
    )
    return parser.parse_args()


def jsonl(batch_no: int, lines: int) -> bytes:
    """One tenant's JSONL batch: every line in one of 20 buckets, at one of 3 priorities."""
    out = []
    for i in range(lines):
        width, height = SIZES[(i // 5) % len(SIZES)]
        spec = {
            "task": "generate",
            "prompt": f"a lighthouse at dusk, batch {batch_no} line {i}",
            "params": {"width": width, "height": height, "steps": STEPS[i % len(STEPS)]},
            "priority": PRIORITIES[(i // 20) % len(PRIORITIES)],
            "custom_id": f"b{batch_no}-{i}",
        }
        out.append(json.dumps(spec))
    return ("\n".join(out) + "\n").encode()


def timings(fn: Callable[[], Any], n: int) -> dict[str, float]:
    """Median and p99 milliseconds of `n` calls."""
    return interleaved({"fn": fn}, n)["fn"]


def interleaved(fns: dict[str, Callable[[], Any]], n: int) -> dict[str, dict[str, float]]:
    """Median and p99 milliseconds of `n` calls of each function, taking turns (before beside now: the
    machine's load moves both alike)."""
    ms: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(n):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            ms[name].append((time.perf_counter() - started) * 1000)
    return {
        name: {"median_ms": round(statistics.median(v), 2), "p99_ms": round(percentile(v, 0.99), 2)}
        for name, v in ms.items()
    }


def plans(engine: Any) -> dict[str, dict[str, float]]:
    """EXPLAIN (ANALYZE, BUFFERS) of the queries behind claim, peek, sweep and /metrics, before and now:
    server time and pages touched, which do not move with the machine's load as wall times do."""
    from bench import queue_before
    from core.fair_share import _PEEK_ANY, oldest_ids, queue_head
    from core.jobs import find_unclaimed_query

    with engine.begin() as conn:
        head = queue_head(conn, ["generate"])
        assert head is not None
        peek = {"tasks": ["generate"], "bucket": None, "first": 1, "last": 1, "max_running": 0}
        before = dict(peek, last=queue_before.TURNS_PER_READ)
        queries: dict[str, tuple[str, dict[str, Any]]] = {
            "claim pick (8 of one group)": (inline_sql(oldest_ids(head, 8)), {}),
            "peek before: counters (4 turns)": (queue_before._URGENT.text, before),
            "peek now: one statement (1 turn)": (_PEEK_ANY.text, peek),
            "sweep search": (inline_sql(find_unclaimed_query("generate", 30, 100)), {}),
        }
        out = {name: explain(conn, sql, params) for name, (sql, params) in queries.items()}
        conn.rollback()
    return out


def measure(engine: Any, settings: Any, base_url: str, samples: int, scrapes: int) -> dict[str, Any]:
    from sqlalchemy import text, update

    from bench import queue_before
    from core.db import make_engine
    from core.jobs import bucket_key, claim_batch, peek_head
    from core.queue import make_publisher
    from core.schema import jobs
    from worker.sweeper import sweep, sweep_database

    buckets = [
        bucket_key("generate", {"width": w, "height": h, "steps": s, "cfg_scale": 3.0, "guidance": 3.5})
        for w, h in SIZES
        for s in STEPS
    ]
    turn = iter(range(10**9))

    def claim() -> None:
        with engine.begin() as conn:
            bucket = buckets[next(turn) % len(buckets)]
            rows = claim_batch(
                conn, worker_id="bench", tasks=["generate"], max_batch=8, lease_s=600, bucket=bucket
            )
            assert len(rows) == 8, (bucket, len(rows))

    def claim_before() -> None:
        with engine.begin() as conn:
            bucket = buckets[next(turn) % len(buckets)]
            rows = queue_before.claim(conn, bucket, 8, "bench", 600)
            assert len(rows) == 8, (bucket, len(rows))

    def peek() -> None:
        with engine.connect() as conn:
            assert peek_head(conn, ["generate"], full_at=8, window_s=0.2) is not None

    def peek_before() -> None:
        with engine.connect() as conn:
            assert queue_before.peek(conn, ["generate"], full_at=8, window_s=0.2) is not None

    from bench import position_before
    from core.job_view import read_job_view

    picks = iter(range(10**9))
    reader = make_engine(settings, 1, autocommit=True, max_overflow=0)
    sample: list[Any] = []

    def pick() -> Any:
        if not sample:  # queued jobs spread over the queue (tenants, priorities, depths), after the claims
            with engine.connect() as conn:
                sample.extend(
                    conn.execute(
                        text(
                            "SELECT tenant_id, id FROM jobs WHERE status = 'queued'"
                            " ORDER BY random() LIMIT 200"
                        )
                    ).all()
                )
        return sample[next(picks) % len(sample)]

    def get() -> None:
        tenant_id, job_id = pick()
        with reader.connect() as conn:
            found = read_job_view(conn, tenant_id, job_id, 8)
            assert found is not None and found[2] is not None

    def get_before() -> None:
        tenant_id, job_id = pick()
        with reader.connect() as conn:
            assert position_before.read_job_view(conn, tenant_id, job_id)[-1] is not None

    publisher = make_publisher(settings)
    metrics = httpx.Client(base_url=base_url, timeout=60)

    def scrape() -> None:
        metrics.get("/metrics").raise_for_status()

    with engine.begin() as conn:  # fresh statistics after the bulk load, as autovacuum's analyze gives
        conn.execute(text("ANALYZE jobs"))
    sweep(engine, publisher, settings)  # fold the fill's counter rows, as beat does every 15 s
    result: dict[str, Any] = {
        "plans": plans(engine),
        **interleaved({"claim_before": claim_before, "claim": claim}, samples),
        **interleaved({"peek_before": peek_before, "peek": peek}, samples),
        **interleaved({"get_before": get_before, "get": get}, samples),
        "sweep": timings(lambda: sweep_database(engine, settings), scrapes),
        "sweep_with_wakeups": timings(lambda: sweep(engine, publisher, settings), scrapes),
        "metrics": timings(scrape, scrapes),
    }
    with engine.begin() as conn:  # put the claimed jobs back (untimed), so every depth is what it says
        conn.execute(
            update(jobs)
            .where(jobs.c.status == "running", jobs.c.lease_owner == "bench")
            .values(status="queued", stage="queued", lease_owner=None, lease_expires_at=None, attempt=0)
        )
    metrics.close()
    reader.dispose()
    return result


def main() -> int:
    args = parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    root = bench_root("nexusgen-bench-queue-")
    settings, servers = start_services(root)
    api = before_api = None
    results: list[dict[str, Any]] = []
    try:
        from core.auth import create_api_key, create_tenant
        from core.db import make_engine

        engine = make_engine(settings)
        keys = []
        with engine.begin() as conn:
            for t in range(TENANTS):
                create_tenant(conn, f"tenant-{t:02d}")
                keys.append(create_api_key(conn, f"tenant-{t:02d}"))
        base_url, api = start_gunicorn(settings, 2, 4, root / "api.log")
        client = httpx.Client(base_url=base_url, timeout=600)
        fillers = {"now": client}
        if args.baseline:
            from bench.bench_get import extract_revision

            commit = extract_revision(args.baseline, root / "baseline")
            before_url, before_api = start_gunicorn(
                settings, 2, 4, root / "api-before.log", root / "baseline"
            )
            fillers[commit] = httpx.Client(base_url=before_url, timeout=600)
        queued, batch_no = 0, 0
        for depth in depths:
            rates = []
            rates_of: dict[str, list[float]] = {name: [] for name in fillers}
            while queued < depth:
                lines = min(LINES, depth - queued)
                body = jsonl(batch_no, lines)
                headers = {
                    "Authorization": f"Bearer {keys[batch_no % TENANTS]}",
                    "Content-Type": "application/x-ndjson",
                }
                name = list(fillers)[batch_no % len(fillers)]  # the two APIs take turns
                started = time.perf_counter()
                fillers[name].post("/v1/batches", content=body, headers=headers).raise_for_status()
                rates_of[name].append(lines / (time.perf_counter() - started))
                if name == "now":
                    rates.append(rates_of[name][-1])
                queued += lines
                batch_no += 1
            load_before = os.getloadavg()
            row = measure(engine, settings, base_url, args.samples, args.scrapes)
            row.update(
                depth=queued,
                ingest_jobs_per_s=round(statistics.median(rates[-5:]), 1),
                ingest_by_api={n: round(statistics.median(r[-5:]), 1) for n, r in rates_of.items() if r},
                loadavg=[round(x, 2) for x in (*load_before, *os.getloadavg())],
            )
            results.append(row)
            print(json.dumps(row), flush=True)
        for filler in fillers.values():
            filler.close()
        columns = ("claim_before", "claim", "peek_before", "peek", "get_before", "get", "sweep",
                   "sweep_with_wakeups", "metrics")  # fmt: skip
        header = ["queued", *(f"{c} med/p99 ms" for c in columns), "ingest jobs/s", "load 1m"]
        rows = [
            [
                r["depth"],
                *(f"{r[k]['median_ms']}/{r[k]['p99_ms']}" for k in columns),
                r["ingest_jobs_per_s"],
                r["loadavg"][0],
            ]
            for r in results
        ]
        print(table(rows, header))
        if args.baseline:
            names = list(dict.fromkeys(n for r in results for n in r["ingest_by_api"]))
            print(
                table(
                    [[r["depth"], *(r["ingest_by_api"].get(n, "") for n in names)] for r in results],
                    ["queued", *(f"ingest jobs/s, {n}" for n in names)],
                )
            )
        print(plans_table(results, "depth"))
        write_result(
            "queue",
            {
                "bench": "queue",
                "tenants": TENANTS,
                "buckets": len(SIZES) * len(STEPS),
                "priorities": len(PRIORITIES),
                "results": results,
                "cpu_count": os.cpu_count(),
            },
        )
    finally:
        if before_api is not None:
            before_api.terminate()
            before_api.wait(15)
        stop_all(root, servers, api)
    return 0


if __name__ == "__main__":
    sys.exit(main())
