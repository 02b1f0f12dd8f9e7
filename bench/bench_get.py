"""GET /v1/jobs/{id} latency: median and p99 at 8 and 32 connections, where the CPU goes, old vs new.

Starts embedded Postgres, Redis and S3 and the API as production runs it (`nexusgen api`: gunicorn
gthread, JSON access log) on loopback, seeds `--jobs` jobs of one tenant in a realistic mix (half
succeeded with an image result, so answers carry a presigned URL; a quarter queued, so they carry a
queue position; the rest running or failed), then a second process sends `--requests` GETs of random
jobs over N keep-alive connections for each N of `--concurrency`.

Before the runs the seed's counter rows are folded, as beat's sweep does every 15 s (otherwise each
queued job's position would sum the 2,000 delta rows of the seed's one-row inserts: 0.87 instead of 0.3 ms
of Postgres CPU per read).

`--baseline REF` also serves the same database from the code of git revision REF (extracted to a
temporary directory) and interleaves the runs, so old and new are compared on one machine at one load.
`--static` adds a run against `/healthz` (no database, no auth): the ceiling of server plus load
generator on this machine. Each run reports the CPU seconds per request of the API processes, Postgres
and the load generator itself, so a slow figure can be told apart from a starved one.

Run: `python -m bench.bench_get [--baseline 7a4bffc]`; writes bench/results/get.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.services import start_services
from core.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results" / "get.json"
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2_000, help="jobs seeded (one tenant)")
    parser.add_argument("--requests", type=int, default=3_000, help="GET requests per run")
    parser.add_argument("--concurrency", default="8,32", help="comma list of connection counts")
    parser.add_argument("--workers", type=int, default=2, help="API worker processes")
    parser.add_argument("--threads", type=int, default=64, help="threads per API worker (the CLI default)")
    parser.add_argument("--baseline", metavar="REF", help="also serve the code of this git revision")
    parser.add_argument("--static", action="store_true", help="also time GET /healthz (the ceiling)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds per concurrency")
    parser.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="load generator: raw sockets in one thread (light), or httpx in a thread per connection",
    )
    # internal: the reader process
    parser.add_argument("--reader", nargs=2, metavar=("BASE_URL", "KEY"), help=argparse.SUPPRESS)
    parser.add_argument("--paths-file", help=argparse.SUPPRESS)
    parser.add_argument("--connections", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_reader(
    base_url: str, key: str, paths: list[str], requests: int, concurrency: int, client: str
) -> dict[str, Any]:
    """GET random paths over `concurrency` keep-alive connections; latency in ms per request."""
    run = run_raw if client == "raw" else run_httpx
    cpu, started = time.process_time(), time.perf_counter()
    latencies, errors, started = run(base_url, key, paths, requests, concurrency)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        "requests": len(latencies),
        "errors": errors,
        "connections": concurrency,
        "client": client,
        "median_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "max_ms": round(max(latencies), 2),
        "requests_per_s": round(len(latencies) / wall, 1),
        "seconds": round(wall, 2),
        "reader_cpu_ms_per_request": round(cpu * 1000 / len(latencies), 3),
    }


def run_httpx(
    base_url: str, key: str, paths: list[str], requests: int, concurrency: int
) -> tuple[list[float], int, float]:
    """One httpx client per connection, each in its own thread (what a Python user would write)."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    per_thread = [
        requests // concurrency + (1 if i < requests % concurrency else 0) for i in range(concurrency)
    ]
    gate = threading.Barrier(concurrency + 1)

    def worker(count: int, seed: int) -> None:
        nonlocal errors
        rng = random.Random(seed)
        with httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as client:
            client.get(paths[0])  # connect before the clock starts
            gate.wait()
            for _ in range(count):
                started = time.perf_counter()
                response = client.get(rng.choice(paths))
                elapsed = (time.perf_counter() - started) * 1000
                with lock:
                    latencies.append(elapsed)
                    errors += response.status_code != 200

    threads = [threading.Thread(target=worker, args=(n, i)) for i, n in enumerate(per_thread)]
    for t in threads:
        t.start()
    gate.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    return latencies, errors, started


def answer_size(buffer: bytearray) -> tuple[int, bool] | None:
    """(bytes, status is 200) of the complete HTTP answer at the start of `buffer`, None if incomplete."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = bytes(buffer[:head_end]).lower()
    length_at = head.find(b"\r\ncontent-length:")
    if length_at < 0:
        raise RuntimeError(f"an answer without Content-Length: {head[:200]!r}")
    line_end = head.find(b"\r\n", length_at + 2)
    size = head_end + 4 + int(head[length_at + 17 : line_end if line_end > 0 else len(head)])
    return (size, head.startswith(b"http/1.1 200")) if len(buffer) >= size else None


def run_raw(
    base_url: str, key: str, paths: list[str], requests: int, concurrency: int
) -> tuple[list[float], int, float]:
    """All connections driven by one thread over sockets, requests prepared in advance: a load generator
    that costs a small fraction of httpx's CPU, so the 2 cores are left to the server."""
    host, port = base_url.removeprefix("http://").split(":")
    rng = random.Random(0)
    prepared = [
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
        for path in [paths[0]] + [rng.choice(paths) for _ in range(requests)]
    ]
    buffers: dict[socket.socket, bytearray] = {}
    since: dict[socket.socket, float] = {}
    latencies: list[float] = []
    errors = 0

    def receive(sock: socket.socket) -> tuple[int, bool] | None:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the server closed a keep-alive connection")
        buffers[sock] += chunk
        return answer_size(buffers[sock])

    for _ in range(min(concurrency, requests)):  # connect and answer one request before the clock starts
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffers[sock] = bytearray()
        sock.sendall(prepared[0])
        while (answer := receive(sock)) is None:
            pass
        del buffers[sock][: answer[0]]
    selector = selectors.DefaultSelector()
    sent = 1
    started = time.perf_counter()
    for sock in buffers:
        selector.register(sock, selectors.EVENT_READ)
        since[sock] = time.perf_counter()
        sock.sendall(prepared[sent])
        sent += 1
    while len(latencies) < requests:
        for event, _ in selector.select():
            sock = event.fileobj  # type: ignore[assignment]
            answer = receive(sock)
            if answer is None:
                continue
            latencies.append((time.perf_counter() - since[sock]) * 1000)
            errors += not answer[1]
            del buffers[sock][: answer[0]]
            if sent <= requests:
                since[sock] = time.perf_counter()
                sock.sendall(prepared[sent])
                sent += 1
    for sock in buffers:
        sock.close()
    return latencies, errors, started


@dataclass
class Server:
    """One API (`nexusgen api`) serving the code under `root`."""

    name: str
    root: Path
    base_url: str
    proc: subprocess.Popen[bytes]
    log: Any = field(repr=False)

    def cpu_s(self) -> float:
        return tree_cpu_s(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def tree_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of a process and its children, the live ones and those that ended
    (Postgres ends a backend for each connection a pool drops)."""
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def start_api(
    name: str, root: Path, settings: Settings, workers: int, threads: int, log_path: Path
) -> Server:
    from nexusgen import embedded

    port = embedded.free_port()
    env = dict(os.environ)
    env.update(settings.to_env())
    env.update({"NEXUSGEN_API_PORT": str(port), "NEXUSGEN_API_HOST": "127.0.0.1", "PYTHONPATH": str(root)})
    env.pop("NEXUSGEN_STATE_DIR", None)
    env["NEXUSGEN_STATE_DIR"] = str(log_path.parent / f"state-{name}")
    argv = [sys.executable, "-c", "import sys; from nexusgen.cli import main; sys.exit(main())",
            "api", "--workers", str(workers), "--threads", str(threads)]  # fmt: skip
    log = open(log_path, "wb")  # noqa: SIM115 - the child writes to it until it stops
    proc = subprocess.Popen(
        argv, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    embedded.wait_for_port(port, 60, proc, f"api ({name})")
    return Server(name, root, f"http://127.0.0.1:{port}", proc, log)


def extract_revision(ref: str, dest: Path) -> str:
    """The tree of git revision `ref` under `dest`; returns its short hash."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", ref], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    dest.mkdir(parents=True)
    archive = subprocess.Popen(["git", "archive", commit], cwd=REPO, stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {commit} failed")
    return commit


def seed(settings: Settings, tenant_id: str, n: int) -> list[str]:
    """`n` jobs in a mix of states, with image results for the succeeded ones; returns their ids."""
    from sqlalchemy import text, update

    from core.counts import compact_counts
    from core.db import make_engine
    from core.ids import new_id
    from core.ingest import job_row
    from core.schema import jobs, results
    from core.submit import validate_job

    engine = make_engine(settings)
    rng = random.Random(7)
    now = datetime.now(UTC)
    rows = []
    for i in range(n):
        prompt = f"a lighthouse at dusk, variation {i}"
        draft = validate_job({"task": "generate", "prompt": prompt, "metadata": {"row": i}}, settings)
        rows.append(job_row(tenant_id, None, draft))
    ids = [row["id"] for row in rows]
    kinds = ["succeeded"] * 8 + ["queued"] * 4 + ["running"] * 2 + ["failed"] * 2
    states = {job_id: kinds[i % len(kinds)] for i, job_id in enumerate(ids)}
    with engine.begin() as conn:
        conn.execute(jobs.insert(), rows)
        succeeded = {
            "stage": "done",
            "progress": 1.0,
            "finished_at": now,
            "started_at": now,
            "attempt": 1,
            "provenance": {"seed": 1, "batch_size": 8, "timings_s": {"dit": 3.2}},
        }
        running = {
            "stage": "denoise",
            "step": 12,
            "total_steps": 50,
            "progress": 0.24,
            "started_at": now,
            "attempt": 1,
        }
        failed = {
            "stage": "done",
            "finished_at": now,
            "error_code": "no_image_token",
            "error_message": "the model wrote no image token",
            "attempt": 1,
        }
        for status, extra in (("succeeded", succeeded), ("running", running), ("failed", failed)):
            chosen = [job_id for job_id, s in states.items() if s == status]
            conn.execute(update(jobs).where(jobs.c.id.in_(chosen)).values(status=status, **extra))
        conn.execute(
            results.insert(),
            [
                {
                    "id": new_id("res"),
                    "job_id": job_id,
                    "kind": "image",
                    "object_key": f"tenants/{tenant_id}/jobs/{job_id}/result.png",
                    "content_type": "image/png",
                    "size_bytes": 400_000 + rng.randrange(1000),
                    "sha256": f"{rng.getrandbits(256):064x}",
                    "width": 1024,
                    "height": 1024,
                    "expires_at": now + timedelta(days=7),
                }
                for job_id, s in states.items()
                if s == "succeeded"
            ],
        )
    with engine.begin() as conn:  # as beat's sweep does every 15 s: the seed's inserts, one statement a
        compact_counts(conn)  # row, left 2,000 delta rows that every queued job's position would sum
        conn.execute(text("ANALYZE"))
    engine.dispose()
    return ids


def read(
    server: Server, key: str, paths: list[str], requests: int, connections: int, pg_pid: int, client: str
) -> dict[str, Any]:
    """One reader run against `server`, with the CPU each side spent."""
    paths_file = server.root / f".bench-paths-{os.getpid()}.json"
    if server.root == REPO:
        paths_file = Path(tempfile.gettempdir()) / f"nexusgen-bench-get-paths-{os.getpid()}.json"
    paths_file.write_text(json.dumps(paths))
    load = os.getloadavg()[0]
    api_cpu, pg_cpu = server.cpu_s(), tree_cpu_s(pg_pid)
    reader = subprocess.run(
        [sys.executable, "-m", "bench.bench_get", "--reader", server.base_url, key, "--paths-file",
         str(paths_file), "--requests", str(requests), "--connections", str(connections), "--client", client],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    api_cpu, pg_cpu = server.cpu_s() - api_cpu, tree_cpu_s(pg_pid) - pg_cpu
    paths_file.unlink(missing_ok=True)
    result: dict[str, Any] = json.loads(reader.stdout.strip().splitlines()[-1])
    n = result["requests"]
    result.update(
        api_cpu_ms_per_request=round(api_cpu * 1000 / n, 3),
        postgres_cpu_ms_per_request=round(pg_cpu * 1000 / n, 3),
        load_1m_before=round(load, 2),
    )
    return result


def describe(name: str, r: dict[str, Any]) -> str:
    return (
        f"{name:<24} {r['connections']:>4} {r['median_ms']:>9.1f} {r['p99_ms']:>9.1f}"
        f" {r['requests_per_s']:>8.0f}"
        f" {r['api_cpu_ms_per_request']:>8.2f} {r['postgres_cpu_ms_per_request']:>8.2f}"
        f" {r['reader_cpu_ms_per_request']:>8.2f} {r['errors']:>5} {r['load_1m_before']:>6.2f}"
    )


HEADER = (
    f"{'server':<24} {'conn':>4} {'median ms':>9} {'p99 ms':>9} {'req/s':>8} {'api cpu':>8} {'pg cpu':>8}"
    f" {'gen cpu':>8} {'errs':>5} {'load':>6}   (cpu: ms per request)"
)


def main() -> int:
    args = parse_args()
    if args.reader:  # the second process: the load generator
        paths = json.loads(Path(args.paths_file).read_text())
        print(json.dumps(run_reader(*args.reader, paths, args.requests, args.connections, args.client)))
        return 0

    connections = [int(c) for c in args.concurrency.split(",")]
    root = Path(tempfile.mkdtemp(prefix="nexusgen-bench-get-"))
    os.chmod(root, 0o755)  # the embedded Postgres runs as an unprivileged user
    started = time.perf_counter()
    print(f"uptime at start: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    settings, services = start_services(root)
    servers: list[Server] = []
    try:
        from core.auth import create_api_key, create_tenant
        from core.db import make_engine

        engine = make_engine(settings)
        with engine.begin() as conn:
            tenant_id, _ = create_tenant(conn, "bench")
            key = create_api_key(conn, "bench")
        engine.dispose()
        ids = seed(settings, tenant_id, args.jobs)
        paths = [f"/v1/jobs/{job_id}" for job_id in ids]
        pg_pid = services[-1].process.pid
        baseline = None
        if args.baseline:
            baseline = extract_revision(args.baseline, root / "baseline")
            name, log = f"baseline {baseline}", root / "api-baseline.log"
            servers.append(start_api(name, root / "baseline", settings, args.workers, args.threads, log))
        servers.append(start_api("this tree", REPO, settings, args.workers, args.threads, root / "api.log"))
        for server in servers:  # warm every worker's pools and caches
            read(server, key, paths, 400, max(connections), pg_pid, args.client)
        print(f"{args.jobs} jobs seeded; API: {args.workers} workers x {args.threads} threads; "
              f"{args.requests} requests per run")  # fmt: skip
        print(HEADER, flush=True)
        runs: list[dict[str, Any]] = []
        for n in connections:
            for _ in range(args.rounds):
                for server in servers:
                    result = read(server, key, paths, args.requests, n, pg_pid, args.client)
                    runs.append({"server": server.name, "path": "/v1/jobs/{id}", **result})
                    print(describe(server.name, result), flush=True)
            if args.static:
                result = read(servers[-1], key, ["/healthz"], args.requests, n, pg_pid, args.client)
                runs.append({"server": servers[-1].name, "path": "/healthz", **result})
                print(describe("/healthz (ceiling)", result), flush=True)
        print(f"uptime at end: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
        print(f"{time.perf_counter() - started:.0f} s in all")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(
            json.dumps(
                {
                    "bench": "get",
                    "jobs": args.jobs,
                    "server": {"command": "nexusgen api", "workers": args.workers, "threads": args.threads},
                    "baseline": baseline,
                    "runs": runs,
                    "environment": {"python": platform.python_version(), "cpu_count": os.cpu_count()},
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {RESULTS}")
    finally:
        for server in servers:
            server.stop()
        for service in services:
            service.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
