"""API ingest: jobs accepted per second for one 10,000-line JSONL batch, and GET /v1/jobs/{id} latency.

Starts embedded Postgres, Redis and S3 (the servers the tests use) and the real API under gunicorn
(`api.app:create_app()`, gthread workers) on loopback. Times one JSONL POST of `--jobs` lines, then a
second process sends `--requests` GET /v1/jobs/{id} over `--concurrency` keep-alive connections and
reports median and p99 latency. Run: `python -m bench.bench_ingest`; writes bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.bench_get import run_reader
from bench.services import REPO, bench_root, start_gunicorn, start_services, stop_all

RESULTS = Path(__file__).resolve().parent / "results" / "ingest.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="lines in the JSONL batch")
    parser.add_argument("--requests", type=int, default=2_000, help="GET requests in the latency run")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent connections of the reader")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--threads", type=int, default=4, help="threads per gunicorn worker")
    # internal: the reader process
    parser.add_argument("--reader", nargs=2, metavar=("BASE_URL", "KEY"), help=argparse.SUPPRESS)
    parser.add_argument("--ids-file", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def jsonl_body(n: int) -> bytes:
    """A realistic mix: three output sizes and two languages, each line with its custom_id."""
    sizes = [(512, 512), (768, 512), (1024, 1024)]
    lines = []
    for i in range(n):
        width, height = sizes[i % 3]
        prompt = f"a lighthouse at dusk, variation {i}" if i % 2 else f"黄昏时的灯塔，变体 {i}"
        spec = {
            "task": "generate",
            "prompt": prompt,
            "params": {"width": width, "height": height, "steps": 20, "language": "en" if i % 2 else "zh"},
            "metadata": {"row": i},
            "custom_id": f"row-{i}",
        }
        lines.append(json.dumps(spec, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode()


def main() -> int:
    args = parse_args()
    if args.reader:  # the second process
        ids = json.loads(Path(args.ids_file).read_text())
        paths = [f"/v1/jobs/{job_id}" for job_id in ids]
        print(json.dumps(run_reader(*args.reader, paths, args.requests, args.concurrency, "httpx")))
        return 0

    root = bench_root("nexusgen-bench-ingest-")
    settings, servers = start_services(root)
    api = None
    try:
        from core.auth import create_api_key, create_tenant
        from core.db import make_engine

        engine = make_engine(settings)
        with engine.begin() as conn:
            create_tenant(conn, "bench")
            key = create_api_key(conn, "bench")
        engine.dispose()
        base_url, api = start_gunicorn(settings, args.workers, args.threads, root / "api.log")
        body = jsonl_body(args.jobs)
        ndjson = {"Content-Type": "application/x-ndjson"}
        with httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=300
        ) as client:
            for _ in range(2):  # warm both workers' connection pools
                client.post("/v1/batches", content=jsonl_body(100), headers=ndjson).raise_for_status()
            started = time.perf_counter()
            answer = client.post("/v1/batches", content=body, headers=ndjson)
            seconds = time.perf_counter() - started
            answer.raise_for_status()
            batch_id = answer.json()["id"]
            assert answer.json()["total_jobs"] == args.jobs
            ids: list[str] = []
            cursor = None
            while len(ids) < args.jobs:
                params = {"batch_id": batch_id, "limit": 1000, **({"cursor": cursor} if cursor else {})}
                page = client.get("/v1/jobs", params=params).json()
                ids += [j["id"] for j in page["data"]]
                cursor = page["next_cursor"]
                if cursor is None:
                    break
        ingest = {
            "jobs": args.jobs,
            "body_bytes": len(body),
            "seconds": round(seconds, 3),
            "jobs_per_s": round(args.jobs / seconds, 1),
        }
        print(f"ingest: {args.jobs} jobs in {seconds:.2f} s = {ingest['jobs_per_s']:.0f} jobs/s", flush=True)
        ids_file = root / "ids.json"
        ids_file.write_text(json.dumps(ids))
        reader = subprocess.run(
            [sys.executable, "-m", "bench.bench_ingest", "--reader", base_url, key,
             "--ids-file", str(ids_file), "--requests", str(args.requests),
             "--concurrency", str(args.concurrency)],
            cwd=REPO, capture_output=True, text=True, check=True,
        )  # fmt: skip
        latency = json.loads(reader.stdout.strip().splitlines()[-1])
        print(
            f"GET /v1/jobs/{{id}}: median {latency['median_ms']} ms, p99 {latency['p99_ms']} ms over "
            f"{latency['requests']} requests ({latency['connections']} connections, "
            f"{latency['errors']} errors, {latency['requests_per_s']} req/s)",
            flush=True,
        )
        result = {
            "bench": "ingest",
            "ingest": ingest,
            "get_job_latency": latency,
            "server": {"kind": "gunicorn gthread", "workers": args.workers, "threads": args.threads},
            "environment": {
                "python": platform.python_version(),
                "cpu_count": os.cpu_count(),
                "load_average_1m_at_end": os.getloadavg()[0],
            },
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS}")
    finally:
        stop_all(root, servers, api)
    return 0


if __name__ == "__main__":
    sys.exit(main())
