"""Service throughput: jobs/s through API -> Postgres -> broker -> worker -> S3, over the model alone.

One run, same machine, same tiny checkpoint and batch size: first `NexusGen.generate` is called directly
on batches of `--batch` (the ceiling), then the same jobs go through the whole service (embedded
Postgres, Redis and S3; the real API on a loopback HTTP server; one real Celery worker process) and are
timed from the POST until the batch reports every job succeeded. Writes bench/results/service.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import base_parser, median
from bench.services import start_services
from core.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results" / "service.json"
REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=64, help="jobs per timed run")
    parser.add_argument("--batch", type=int, default=8, help="NEXUSGEN_MAX_BATCH and the direct batch size")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 8], help="denoising steps (one run each)")
    parser.add_argument("--size", type=int, default=256, help="output width and height")
    # One torch thread in the bench and in the worker: on a small shared CPU, more threads oversubscribe.
    parser.set_defaults(threads=1, runs=1)
    return parser.parse_args()


def job_specs(n: int, steps: int, size: int) -> list[dict[str, Any]]:
    params = {"width": size, "height": size, "steps": steps}
    return [
        {"task": "generate", "prompt": f"a lighthouse, variation {i}", "params": {**params, "seed": i}}
        for i in range(n)
    ]


def direct_throughput(
    settings: Settings, specs: list[dict[str, Any]], batch: int, device: str, runs: int
) -> dict[str, float]:
    """jobs/s of NexusGen.generate on batches of `batch` (median of `runs`, after a warm-up call)."""
    from model.pipeline import NexusGen
    from model.requests import GenerateRequest

    assert settings.model_dir is not None
    model = NexusGen.from_pretrained(settings.model_dir, device=device, prefix_mode="forced")
    requests = [GenerateRequest(prompt=s["prompt"], **s["params"]) for s in specs]
    model.generate(requests[:batch])
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        for i in range(0, len(requests), batch):
            results = model.generate(requests[i : i + batch])
            assert all(r.image is not None for r in results)
        times.append(time.perf_counter() - started)
    elapsed = median(times)
    return {"seconds": round(elapsed, 3), "jobs_per_s": round(len(requests) / elapsed, 3)}


def start_worker(settings: Settings, threads: int, log_path: Path) -> subprocess.Popen[bytes]:
    """One real model worker process (`celery -A worker.app:celery_app worker`) on the model queues."""
    env = dict(os.environ)
    env.update(settings.to_env())
    env["OMP_NUM_THREADS"] = str(threads)
    argv = [sys.executable, "-m", "celery", "-A", "worker.app:celery_app", "worker", "-Q",
            "nexusgen.generate,nexusgen.edit,nexusgen.understand", "-c", "1", "--without-gossip",
            "--without-mingle", "--loglevel", "INFO"]  # fmt: skip
    log = open(log_path, "wb")  # noqa: SIM115 - the child writes to it until it stops
    return subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def make_key(settings: Settings) -> str:
    """A tenant and an API key for the bench."""
    from core.auth import create_api_key, create_tenant
    from core.db import make_engine

    engine = make_engine(settings)
    with engine.begin() as conn:
        create_tenant(conn, "bench")
        key = create_api_key(conn, "bench")
    engine.dispose()
    return key


def serve_api(settings: Settings) -> tuple[str, Any]:
    """The real API (create_app) on a threaded loopback HTTP server."""
    from werkzeug.serving import make_server

    from api.app import create_app

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per poll

    server = make_server("127.0.0.1", 0, create_app(settings), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", server


def run_batch(client: httpx.Client, specs: list[dict[str, Any]], timeout_s: float = 600) -> tuple[float, str]:
    """POST the batch and wait until all its jobs succeeded; returns (seconds from POST to done, batch id)."""
    started = time.perf_counter()
    answer = client.post("/v1/batches", json={"jobs": specs})
    answer.raise_for_status()
    batch_id = answer.json()["id"]
    deadline = started + timeout_s
    while time.perf_counter() < deadline:
        counts = client.get(f"/v1/batches/{batch_id}").json()["counts"]
        if counts.get("succeeded", 0) == len(specs):
            return time.perf_counter() - started, batch_id
        if counts.get("failed") or counts.get("canceled"):
            raise RuntimeError(f"batch {batch_id} had failures: {counts}")
        time.sleep(0.1)
    raise TimeoutError(f"batch {batch_id} not done after {timeout_s} s")


def worker_stats(settings: Settings, batch_id: str) -> dict[str, Any]:
    """From the jobs' provenance: the batch sizes the worker ran, and its jobs/s inside model calls only."""
    from sqlalchemy import select

    from core.db import make_engine
    from core.schema import jobs

    engine = make_engine(settings)
    with engine.connect() as conn:
        provenance = (
            conn.execute(select(jobs.c.provenance).where(jobs.c.batch_id == batch_id)).scalars().all()
        )
    engine.dispose()
    sizes: dict[str, int] = {}
    model_s = 0.0  # each job's share of its batch's model call
    for prov in provenance:
        sizes[str(prov["batch_size"])] = sizes.get(str(prov["batch_size"]), 0) + 1
        model_s += prov["timings"]["model_call_s"] / prov["batch_size"]
    return {"batch_sizes": sizes, "model_call_jobs_per_s": round(len(provenance) / model_s, 3)}


def main() -> int:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="nexusgen-bench-"))
    from model.tiny import write_tiny_checkpoint

    settings, servers = start_services(
        root, model_dir=str(write_tiny_checkpoint(root / "tiny", seed=0)), prefix_mode="forced"
    )
    settings = settings.with_overrides(device=args.device, max_batch=args.batch)
    worker = None
    api_server = None
    runs = []
    try:
        direct = {
            s: direct_throughput(
                settings, job_specs(args.jobs, s, args.size), args.batch, args.device, args.runs
            )
            for s in args.steps
        }
        worker = start_worker(settings, args.threads, root / "worker.log")
        base_url, api_server = serve_api(settings)
        key = make_key(settings)
        auth = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base_url, headers=auth, timeout=60) as client:
            run_batch(client, job_specs(args.batch, args.steps[0], args.size))  # warm-up: the model loads
            for steps in args.steps:
                timed = [run_batch(client, job_specs(args.jobs, steps, args.size)) for _ in range(args.runs)]
                seconds = median([t for t, _ in timed])
                service = {"seconds": round(seconds, 3), "jobs_per_s": round(args.jobs / seconds, 3)}
                ratio = service["jobs_per_s"] / direct[steps]["jobs_per_s"]
                stats = worker_stats(settings, timed[-1][1])
                runs.append(
                    {"steps": steps, "service": service, "direct": direct[steps], "ratio": round(ratio, 3)}
                    | {"worker": stats}
                )
                print(
                    f"steps={steps:3d}  service {service['jobs_per_s']:7.2f} jobs/s  "
                    f"direct {direct[steps]['jobs_per_s']:7.2f} jobs/s  ratio {ratio:.2f}  "
                    f"(worker model calls alone {stats['model_call_jobs_per_s']:.2f} jobs/s, "
                    f"batch sizes {stats['batch_sizes']})",
                    flush=True,
                )
    finally:
        if api_server is not None:
            api_server.shutdown()
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(30)
        for server in servers:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    report = {
        "bench": "service",
        "what": "generate jobs/s via API->DB->broker->worker->S3 over direct NexusGen.generate jobs/s",
        "config": {k: getattr(args, k) for k in ("jobs", "batch", "size", "threads", "runs", "device")},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "runs": runs,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
