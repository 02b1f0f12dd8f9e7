"""Embedded Postgres, Redis and S3 for the service benches (the servers `nexusgen up` and the tests use),
the API under gunicorn, and their teardown."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from core.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def bench_root(prefix: str) -> Path:
    """A fresh temporary folder for one run's servers, readable by the embedded Postgres's own user."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(root, 0o755)  # the embedded Postgres runs as an unprivileged user
    return root


def start_services(root: Path, **overrides: Any) -> tuple[Settings, list[Any]]:
    """Start the three servers under `root`, migrate and make the bucket; return settings and servers."""
    from core.migrate import upgrade
    from core.storage import Storage
    from nexusgen import embedded

    pg = embedded.start_postgres(root / "pg", embedded.free_port(), root / "pg.log")
    redis = embedded.start_redis(root / "redis", embedded.free_port(), root / "redis.log")
    access, secret = embedded.s3_credentials(root)
    s3 = embedded.start_s3(root / "s3", embedded.free_port(), root / "s3.log", access, secret)
    settings = Settings(
        database_url=pg.url,
        broker_url=redis.url,
        s3_endpoint_url=s3.url,
        s3_access_key=access,
        s3_secret_key=secret,
        s3_bucket="bench",
        state_dir=root / "state",
        **overrides,
    )
    upgrade(settings)
    Storage.from_settings(settings).ensure_bucket()
    return settings, [s3, redis, pg]


def start_gunicorn(
    settings: Settings, workers: int, threads: int, log_path: Path, code: Path = REPO
) -> tuple[str, Any]:
    """The real API (`api.app:create_app()`, gthread workers) on a free loopback port: (base URL, process).

    `code`: the source tree it runs (another revision's, for a comparison on the same servers)."""
    from nexusgen import embedded

    port = embedded.free_port()
    env = dict(os.environ)
    env.update(settings.to_env())
    env["PYTHONPATH"] = str(code)
    argv = [sys.executable, "-m", "gunicorn", "-w", str(workers), "-k", "gthread", "--threads", str(threads),
            "-b", f"127.0.0.1:{port}", "--timeout", "120", "api.app:create_app()"]  # fmt: skip
    log = open(log_path, "wb")  # noqa: SIM115 - the child writes to it until it stops
    proc = subprocess.Popen(
        argv, cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    embedded.wait_for_port(port, 60, proc, "gunicorn")
    return f"http://127.0.0.1:{port}", proc


def stop_all(root: Path, servers: list[Any], api: Any = None) -> None:
    """Stop the API (if started), then the servers, and remove the run's folder."""
    if api is not None:
        api.terminate()
        try:
            api.wait(15)
        except subprocess.TimeoutExpired:
            api.kill()
    for server in servers:
        server.stop()
    shutil.rmtree(root, ignore_errors=True)
