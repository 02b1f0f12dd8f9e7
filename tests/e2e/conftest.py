"""Helpers for whole-stack runs: free ports, a clean environment, and `nexusgen up` as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.dirs import open_dir

ROOT = Path(__file__).resolve().parents[2]
# Variables that would point `up` at existing servers instead of embedded ones.
SERVICE_VARS = (
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND",
    "S3_ENDPOINT_URL",
    "NEXUSGEN_MODEL_DIR",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def stack_env(state_dir: Path, **extra: str) -> dict[str, str]:
    """An environment for `nexusgen up`/`demo`: embedded servers, non-default ports, fast sweeps."""
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARS}
    env.update(
        NEXUSGEN_STATE_DIR=str(state_dir),
        NEXUSGEN_API_PORT=str(free_port()),
        NEXUSGEN_FLOWER_PORT=str(free_port()),
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


@dataclass
class UpProcess:
    """One run of `nexusgen up`; `info` is its STATE_DIR/up.json once it is ready."""

    env: dict[str, str]
    cwd: Path
    process: subprocess.Popen[bytes] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return Path(self.env["NEXUSGEN_STATE_DIR"])

    def start(self, timeout_s: float = 240) -> dict[str, Any]:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / "up-test.log").open("ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "nexusgen.cli", "up"],
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=log,
            )
        info_path = self.state_dir / "up.json"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if info_path.exists():
                info = json.loads(info_path.read_text())
                if info.get("pid") == self.process.pid:
                    self.info = info
                    return info
            if self.process.poll() is not None:
                pytest.fail(f"`nexusgen up` exited with {self.process.returncode}:\n{self.log_tail()}")
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"`nexusgen up` was not ready within {timeout_s} s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 90) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"`nexusgen up` did not stop within {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        parts = []
        for path in [self.state_dir / "up-test.log", *sorted((self.state_dir / "logs").glob("*.log"))]:
            if path.exists():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)


@pytest.fixture
def stack_dir() -> Iterator[Path]:
    """A working dir for a whole stack, outside pytest's temp root: its embedded PostgreSQL keeps its data
    there (tests/support/dirs.py says why); removed afterwards."""
    with open_dir("nexusgen-e2e-") as path:
        yield path


@pytest.fixture
def up_process(stack_dir: Path) -> Any:
    """A factory of `nexusgen up` runs sharing one state dir; every run is stopped at the end."""
    runs: list[UpProcess] = []
    state_dir = stack_dir / "state"

    def make(**extra: str) -> UpProcess:
        env = stack_env(state_dir, **extra) if not runs else dict(runs[0].env, **extra)
        run = UpProcess(env=env, cwd=stack_dir)
        runs.append(run)
        return run

    yield make
    for run in runs:
        if run.process is not None and run.process.poll() is None:
            run.stop()
