"""The chaos stack: embedded PostgreSQL, Redis and S3, the API under gunicorn, a model worker, a webhook
worker and beat, all real processes on this machine, with the faults a run injects into them.

The services run under `nexusgen up`'s Supervisor (a killed one comes back with backoff); the embedded
servers are stopped and started by the run itself, on the same port and data, like an operator would.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from core.settings import Settings
from nexusgen import embedded
from nexusgen.up import Child, Supervisor

# Short leases, sweeps and retry schedules so that recovery happens within a run of a few minutes.
CHAOS_ENV = {
    "NEXUSGEN_MAX_BATCH": "8",
    "NEXUSGEN_LEASE_S": "8",
    "NEXUSGEN_HEARTBEAT_S": "1",
    "NEXUSGEN_SWEEP_INTERVAL_S": "2",
    "NEXUSGEN_REQUEUE_AFTER_S": "4",
    "NEXUSGEN_MAX_ATTEMPTS": "3",
    "WEBHOOK_TIMEOUT_S": "2",
    "WEBHOOK_RETRY_SCHEDULE": "1,2",
    "WEBHOOK_ALLOW_PRIVATE_NETWORKS": "1",
    "NEXUSGEN_PREFIX_MODE": "forced",
    "OMP_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
}


class ChaosStack:
    """Start with `start()`, inject faults with the methods below, `stop()` at the end."""

    def __init__(self, root: Path, model_dir: Path) -> None:
        self.root, self.model_dir = root, model_dir
        self.log_dir = root / "logs"
        self.ports = {name: embedded.free_port() for name in ("postgres", "redis", "s3", "api")}
        self.servers: dict[str, Any] = {}
        self.access, self.secret = embedded.s3_credentials(root)
        self.supervisor: Supervisor | None = None
        self._watching = threading.Event()
        self.faults: list[tuple[float, str]] = []  # (time.monotonic(), what)
        self.outages: list[
            tuple[float, float]
        ] = []  # (down, back up): time.monotonic() of each server outage

    # --- embedded servers -----------------------------------------------------------------------------

    def start_server(self, name: str) -> None:
        port, logs = self.ports[name], self.log_dir / f"{name}.log"
        if name == "postgres":
            self.servers[name] = embedded.start_postgres(self.root / "pg", port, logs)
        elif name == "redis":
            self.servers[name] = embedded.start_redis(self.root / "redis", port, logs)
        else:
            self.servers[name] = embedded.start_s3(self.root / "s3", port, logs, self.access, self.secret)

    def stop_server(self, name: str, *, kill: bool = False) -> None:
        server = self.servers[name]
        if kill:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(10)
        server.stop()

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NEXUSGEN_", "S3_", "CELERY_"))}
        env.update(CHAOS_ENV)
        env.update(
            DATABASE_URL=f"postgresql+psycopg://postgres@127.0.0.1:{self.ports['postgres']}/nexusgen",
            CELERY_BROKER_URL=f"redis://127.0.0.1:{self.ports['redis']}/0",
            S3_ENDPOINT_URL=f"http://127.0.0.1:{self.ports['s3']}",
            S3_ACCESS_KEY=self.access,
            S3_SECRET_KEY=self.secret,
            S3_BUCKET="chaos",
            NEXUSGEN_MODEL_DIR=str(self.model_dir),
            NEXUSGEN_API_PORT=str(self.ports["api"]),
            NEXUSGEN_STATE_DIR=str(self.root / "state"),
            PYTHONPATH=str(Path(__file__).resolve().parents[2]),
        )
        return env

    # --- services ---------------------------------------------------------------------------------------

    def start(self) -> None:
        for name in ("postgres", "redis", "s3"):
            self.start_server(name)
        from core.migrate import upgrade
        from core.storage import Storage

        (self.root / "state").mkdir(parents=True, exist_ok=True)
        upgrade(self.settings)
        Storage.from_settings(self.settings).ensure_bucket()
        cli = [sys.executable, "-m", "nexusgen.cli"]
        self.supervisor = Supervisor(self.env, self.log_dir, backoff_s=(1.0, 2.0, 4.0, 8.0), stable_after_s=5)
        for child in (
            Child("worker-model", [*cli, "worker", "--hostname", "model@%h"], stop_timeout_s=10),
            Child("worker-webhooks", [*cli, "worker", "--webhooks", "--concurrency", "2"], stop_timeout_s=10),
            Child("beat", [*cli, "beat"], stop_timeout_s=5),
            Child("api", [*cli, "api", "--workers", "1", "--threads", "8"], stop_timeout_s=10),
        ):
            self.supervisor.start(child)
        threading.Thread(target=self._watch, daemon=True).start()
        self.wait_api(120)
        self.wait_worker_ready(180)

    def _watch(self) -> None:
        assert self.supervisor is not None
        while not self._watching.wait(0.2):
            failing = self.supervisor.check()
            if failing is not None:
                raise RuntimeError(f"{failing.name} keeps dying; see {failing.log_path}")

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    def wait_api(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.api_url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("the API did not start")

    def child(self, name: str) -> Child:
        assert self.supervisor is not None
        return next(c for c in self.supervisor.children if c.name == name)

    def wait_worker_ready(self, timeout_s: float) -> None:
        log_path = self.child("worker-model").log_path
        assert log_path is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if b" ready." in log_path.read_bytes():
                return
            time.sleep(0.3)
        raise RuntimeError("the model worker did not start")

    def stop(self) -> None:
        self._watching.set()
        if self.supervisor is not None:
            self.supervisor.stop_all()
        for server in reversed(list(self.servers.values())):
            server.stop()

    # --- faults -----------------------------------------------------------------------------------------

    def note(self, what: str) -> None:
        self.faults.append((time.monotonic(), what))

    def kill_worker_main(self) -> None:
        """kill -9 the model worker's main process (the supervisor restarts it; its pool child dies too)."""
        os.kill(self.child("worker-model").process.pid, signal.SIGKILL)
        self.note("kill -9 worker main")

    def kill_worker_child(self) -> bool:
        """kill -9 the model worker's pool child (Celery's main process forks a new one)."""
        main = self.child("worker-model").process.pid
        for pid in pool_children(main):
            os.kill(pid, signal.SIGKILL)
            self.note("kill -9 worker pool child")
            return True
        return False

    def outage(self, name: str, down_s: float, *, kill: bool = True) -> None:
        """Stop an embedded server (kill -9, or a clean stop) for `down_s` seconds, then start it again."""
        down = time.monotonic()
        self.stop_server(name, kill=kill)
        self.note(f"{name} {'killed' if kill else 'stopped'} for {down_s:.0f} s")
        time.sleep(down_s)
        self.start_server(name)
        self.outages.append((down, time.monotonic()))


def pool_children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (a Celery prefork main process's pool)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found
