"""`nexusgen up`'s supervisor with real child processes: a killed child is restarted, the rest keep
running, an embedded server comes back on its port, and a child that keeps dying makes it give up."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from nexusgen import embedded
from nexusgen.up import Child, Supervisor

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]
CRASHER = [sys.executable, "-c", "raise SystemExit(3)"]


def _until(supervisor: Supervisor, done: object, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert supervisor.check() is None
        if callable(done) and done():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_a_killed_child_is_restarted_and_the_others_keep_running(tmp_path: Path) -> None:
    supervisor = Supervisor(dict(os.environ), tmp_path, backoff_s=(0.2, 0.4), stable_after_s=0.5)
    victim, bystander = Child("victim", SLEEPER), Child("bystander", SLEEPER)
    try:
        supervisor.start(victim)
        supervisor.start(bystander)
        first, other = victim.process.pid, bystander.process.pid
        for _ in range(3):  # repeated kill -9: each is logged and restarted
            time.sleep(0.6)  # each ran long enough to count as started
            before = victim.process.pid
            os.kill(before, signal.SIGKILL)
            _until(supervisor, lambda b=before: victim.exit_code is None and victim.process.pid != b)
        assert victim.process.pid != first and bystander.process.pid == other
        assert bystander.exit_code is None
    finally:
        supervisor.stop_all()


def test_a_child_that_keeps_dying_makes_it_give_up(tmp_path: Path) -> None:
    supervisor = Supervisor(dict(os.environ), tmp_path, backoff_s=(0.05, 0.1, 0.2))
    crasher, bystander = Child("crasher", CRASHER), Child("bystander", SLEEPER)
    try:
        supervisor.start(crasher)
        supervisor.start(bystander)
        deadline, failing = time.monotonic() + 30, None
        while failing is None and time.monotonic() < deadline:
            failing = supervisor.check()
            time.sleep(0.02)
        assert failing is crasher and crasher.failures == 4  # three restarts, then it gives up
        assert bystander.exit_code is None
    finally:
        supervisor.stop_all()


def test_an_embedded_redis_killed_comes_back_on_its_port(tmp_path: Path) -> None:
    import redis

    port = embedded.free_port()
    supervisor = Supervisor(dict(os.environ), tmp_path, backoff_s=(0.2,))
    server = Child("redis", launch=lambda: embedded.start_redis(tmp_path / "redis", port, tmp_path / "r.log"))
    try:
        supervisor.start(server)
        client = redis.Redis(port=port, socket_timeout=2)
        client.set("kept", "yes")
        time.sleep(1.2)  # the append-only file is written (fsync every second)
        killed = server.process.pid
        os.kill(killed, signal.SIGKILL)
        _until(supervisor, lambda: server.process.pid != killed and server.exit_code is None)
        assert redis.Redis(port=port, socket_timeout=2).get("kept") == b"yes"  # same data dir (AOF)
    finally:
        supervisor.stop_all()
