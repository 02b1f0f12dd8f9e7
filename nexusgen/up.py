"""`nexusgen up`: start embedded servers for unset URLs, migrate, then supervise the service processes.

Every service runs as its own child process (`nexusgen api`, `worker`, `worker --webhooks`, `beat`,
`flower`) in its own session, logging to STATE_DIR/logs/<service>.log, next to the embedded servers.
A child that dies (a service or an embedded server) is logged and restarted with backoff while the rest
keep running; `up` gives up only on a child whose restarts keep failing. Ctrl-C or SIGTERM stops them in
order (API first, embedded servers last) and kills what does not stop in time.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.settings import Settings
from nexusgen.services import configure_logging

log = logging.getLogger("nexusgen.up")

# --- ports ------------------------------------------------------------------------------------------------


def check_ports(ports: dict[str, tuple[int, str]], host: str = "127.0.0.1") -> None:
    """Raise a clear error naming every port (and the variable that moves it) that is already taken."""
    from nexusgen.embedded import port_bindable

    taken = [
        f"{name} port {port} (set {env})"
        for name, (port, env) in ports.items()
        if not port_bindable(port, host)
    ]
    if taken:
        raise RuntimeError("ports already in use on " + host + ": " + "; ".join(taken))


# --- supervision ------------------------------------------------------------------------------------------

RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0)  # waits before each restart of a child that keeps dying
STABLE_AFTER_S = 10.0  # a child that ran this long started fine: its next death starts the backoff afresh


@dataclass
class Child:
    """One supervised process: a service (`argv`) or an embedded server (`launch` returns its Server)."""

    name: str
    argv: list[str] = field(default_factory=list)
    stop_timeout_s: float = 15.0
    process: Any = None  # subprocess.Popen, or _NotStarted after a restart that could not start
    log_path: Path | None = None
    launch: Callable[[], Any] | None = None  # embedded servers: start again on the same port and data
    server: Any = None
    started_at: float = 0.0
    failures: int = 0  # deaths in a row, each within STABLE_AFTER_S of its start
    restart_at: float | None = None  # when a dead child is due to be started again

    @property
    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()


class _NotStarted:
    """Stands for the process of a restart that failed to start at all (exit status 127)."""

    pid = -1

    def poll(self) -> int:
        return 127

    def send_signal(self, sig: int) -> None:
        return None

    def wait(self, timeout: float | None = None) -> int:
        return 127


@dataclass
class Supervisor:
    """Starts children, restarts any that dies (with backoff), and stops them in reverse order.

    A dead child is logged and restarted while the others keep running; only a child whose restarts
    keep failing (more than len(backoff_s) deaths in a row, each soon after its start) ends the stack.
    """

    env: dict[str, str]
    log_dir: Path
    children: list[Child] = field(default_factory=list)
    backoff_s: tuple[float, ...] = RESTART_BACKOFF_S
    stable_after_s: float = STABLE_AFTER_S

    def start(self, child: Child) -> None:
        self._spawn(child)
        self.children.append(child)

    def _spawn(self, child: Child) -> None:
        child.started_at = time.monotonic()
        if child.launch is not None:
            if child.server is not None:  # a restart: close the dead server's log (its process is gone)
                child.server.stop()
            child.server = child.launch()
            child.process, child.log_path = child.server.process, child.server.log_path
            log.info("started embedded %s (pid %d)", child.name, child.process.pid)
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        child.log_path = self.log_dir / f"{child.name}.log"
        with child.log_path.open("ab") as out:
            # Own session: a terminal's Ctrl-C reaches only `up`, which then stops children in order.
            child.process = subprocess.Popen(
                child.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        log.info("started %s (pid %d): %s", child.name, child.process.pid, shlex.join(child.argv))

    def dead(self) -> list[Child]:
        return [c for c in self.children if c.exit_code is not None]

    def check(self) -> Child | None:
        """Restart dead children whose backoff is over; return a child that keeps failing (give up)."""
        now = time.monotonic()
        for child in self.dead():
            if child.restart_at is None:  # just found dead
                if child.process.pid > 0:
                    kill_group(child.process.pid)  # pool processes a killed leader left behind
                ran_s = now - child.started_at
                child.failures = 1 if ran_s >= self.stable_after_s else child.failures + 1
                if child.failures > len(self.backoff_s):
                    log.error(
                        "%s died %d times in a row, each within %.0f s of its start; giving up",
                        child.name,
                        child.failures,
                        self.stable_after_s,
                    )
                    return child
                wait_s = self.backoff_s[child.failures - 1]
                child.restart_at = now + wait_s
                log.error(
                    "%s (pid %d) exited with status %s after %.1f s; restarting it in %.0f s (log %s)",
                    child.name,
                    child.process.pid,
                    child.exit_code,
                    ran_s,
                    wait_s,
                    child.log_path,
                )
            if now >= child.restart_at:
                child.restart_at = None
                try:
                    self._spawn(child)
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    log.error("restarting %s failed: %s", child.name, exc)
                    child.started_at, child.process = now, _NotStarted()
        return None

    def stop_all(self) -> None:
        """SIGTERM every child at once (API first), then wait for each; SIGKILL what outlives its timeout."""
        started = time.monotonic()
        running = [c for c in reversed(self.children) if c.process is not None and c.process.poll() is None]
        for child in running:
            child.process.send_signal(signal.SIGTERM)
        for child in running:
            remaining = max(0.0, child.stop_timeout_s - (time.monotonic() - started))
            try:
                child.process.wait(timeout=remaining)
                log.info("stopped %s", child.name)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", child.name, child.stop_timeout_s)
            # the whole session: also pool processes a killed or careless leader left behind
            kill_group(child.process.pid)
            child.process.wait(timeout=10)
        for child in self.children:
            if child.server is not None:
                child.server.stop()  # closes its log; the process is already gone
        self.children.clear()


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return


def service_children(settings: Settings, flower_port: int) -> list[Child]:
    """The five service processes of `up`, in start order."""
    cli = [sys.executable, "-m", "nexusgen.cli"]
    return [
        Child("worker-model", [*cli, "worker", "--hostname", "model@%h"], stop_timeout_s=10),
        Child(
            "worker-webhooks",
            [*cli, "worker", "--webhooks", "--concurrency", "2", "--hostname", "webhooks@%h"],
        ),
        Child("beat", [*cli, "beat"], stop_timeout_s=5),
        Child("flower", [*cli, "flower", "--port", str(flower_port)], stop_timeout_s=5),
        Child("api", [*cli, "api", "--workers", "1", "--threads", "64"], stop_timeout_s=10),
    ]


def service_env(settings: Settings) -> dict[str, str]:
    """The environment that makes every child read the same (possibly embedded) settings."""
    env = dict(os.environ)
    env.update(settings.to_env())
    env["PYTHONUNBUFFERED"] = "1"
    return env


STATE_EXPORTS = (
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "S3_ENDPOINT_URL",
    "S3_ACCESS_KEY",
    "S3_SECRET_KEY",
    "S3_BUCKET",
    "NEXUSGEN_MODEL_DIR",
    "NEXUSGEN_PREFIX_MODE",
)


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds the S3 secret)."""
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text)


def write_state_files(settings: Settings, env: dict[str, str], flower_port: int) -> Path:
    """STATE_DIR/env (shell exports for admin commands) and STATE_DIR/up.json (read by the demo)."""
    api_url = f"http://{settings.api_host}:{settings.api_port}"
    exports = {k: env[k] for k in STATE_EXPORTS if k in env} | {"NEXUSGEN_API_URL": api_url}
    _write_private(
        settings.state_dir / "env", "".join(f"export {k}={shlex.quote(v)}\n" for k, v in exports.items())
    )
    info = {
        "pid": os.getpid(),
        "api_url": api_url,
        "flower_url": flower_url(settings, flower_port),
        "env": exports,
    }
    path = settings.state_dir / "up.json"
    _write_private(path, json.dumps(info, indent=2))
    return path


def flower_url(settings: Settings, flower_port: int) -> str:
    """Where `up` serves Flower (with FLOWER_URL_PREFIX when one is set)."""
    prefix = f"/{settings.flower_url_prefix}" if settings.flower_url_prefix else ""
    return f"http://127.0.0.1:{flower_port}{prefix}"


def check_not_running(state_dir: Path) -> None:
    """Refuse a second `up` on a state dir whose first `up` still runs (its servers hold the data)."""
    path = state_dir / "up.json"
    if not path.exists():
        return
    try:
        pid = int(json.loads(path.read_text())["pid"])
        os.kill(pid, 0)
    except (ValueError, KeyError, ProcessLookupError):
        return  # unreadable, or left by an `up` that was killed
    except PermissionError:
        pass
    raise RuntimeError(f"another `nexusgen up` (pid {pid}) is running on {state_dir}; stop it first")


def _wait_healthy(url: str, children: Supervisor, timeout_s: float, stop: threading.Event) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while not stop.is_set():
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if dead := children.dead():
            raise RuntimeError(f"{dead[0].name} exited during start-up; see {dead[0].log_path}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the API did not become healthy within {timeout_s:.0f} s")
        time.sleep(0.5)


def prepare_model_dir(settings: Settings) -> Settings:
    """NEXUSGEN_MODEL_DIR unset: write (once) a tiny checkpoint under the state dir and force the prefix."""
    if settings.model_dir:
        return settings
    directory = settings.state_dir / "tiny-checkpoint"
    marker = directory / ".complete"
    if not marker.exists():
        log.info("NEXUSGEN_MODEL_DIR is unset: writing a tiny random checkpoint to %s", directory)
        subprocess.run(
            [sys.executable, "-m", "nexusgen.cli", "make-tiny-checkpoint", str(directory)], check=True
        )
        marker.touch()
    return settings.with_overrides(model_dir=str(directory), prefix_mode="forced")


def embedded_children(settings: Settings, log_dir: Path) -> tuple[Settings, list[Child]]:
    """Children for PostgreSQL, Redis and SeaweedFS S3 for whichever URL is unset, data under the state dir.

    Each keeps the port of its last start when that is free (a sourced STATE_DIR/env stays valid), and a
    restart after a crash reuses that port and data, so the other children's URLs stay right.
    """
    from nexusgen import embedded

    state, children, changes = settings.state_dir, [], {}

    def embed(name: str, start: Callable[..., Any], *credentials: str) -> int:
        """A child that starts `name` on its remembered port, data in state/NAME; returns the port."""
        port = embedded.remembered_port(state, name)

        def launch() -> Any:
            return start(state / name, port, log_dir / f"{name}.log", *credentials)

        children.append(Child(name, launch=launch))
        return port

    if not settings.database_url:
        pg_port = embed("postgres", embedded.start_postgres)
        changes["database_url"] = f"postgresql+psycopg://postgres@127.0.0.1:{pg_port}/nexusgen"
    if not settings.broker_url:
        changes["broker_url"] = f"redis://127.0.0.1:{embed('redis', embedded.start_redis)}/0"
    if not settings.s3_endpoint_url:
        access, secret = embedded.s3_credentials(state)
        s3_port = embed("s3", embedded.start_s3, access, secret)
        changes.update(
            s3_endpoint_url=f"http://127.0.0.1:{s3_port}", s3_access_key=access, s3_secret_key=secret
        )
    return settings.with_overrides(**changes), children


EMBEDDABLE = {"database_url": "postgres", "broker_url": "redis", "s3_endpoint_url": "s3"}


def check_configured_urls(settings: Settings) -> Settings:
    """Refuse configured URLs where nothing answers, with one line naming the variable.

    A URL that names this state dir's own embedded server (from a sourced STATE_DIR/env) counts as
    unset: that server is started again on the same port.
    """
    from core.settings import ENV_NAMES
    from nexusgen import embedded
    from nexusgen.stack import StackError, address, require_answering

    ports = embedded.remembered_ports(settings.state_dir)
    unset: dict[str, None] = {}
    for field_name, server in EMBEDDABLE.items():
        url = getattr(settings, field_name)
        if not url:
            continue
        variable = ENV_NAMES[field_name]
        if server in ports and address(url) == ("127.0.0.1", ports[server]):
            if not embedded.port_bindable(ports[server]):  # no `up` of ours runs (checked before)
                raise StackError(
                    f"{variable} names the embedded {server} of {settings.state_dir} at port "
                    f"{ports[server]}, which another process now holds; unset {variable} (from a "
                    "sourced env) and `up` picks a new port"
                )
            log.info("%s names the embedded %s of %s: starting it", variable, server, settings.state_dir)
            unset[field_name] = None
            continue
        require_answering(variable, url, None)
    return settings.with_overrides(**unset) if unset else settings


def run_up(settings: Settings) -> int:
    """Run the stack until Ctrl-C or SIGTERM; return the exit status.

    1. refuse a second `up`, taken ports and unreachable configured URLs; 2. the embedded servers, the
    model dir, the schema and the bucket; 3. the services, until the API is healthy; 4. supervise them
    until told to stop or a child keeps dying; 5. stop everything, whatever happened.
    """
    configure_logging("up", settings.log_level)
    settings = settings.with_overrides(state_dir=settings.state_dir.resolve())
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    flower_port = settings.flower_port
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    supervisor: Supervisor | None = None
    state_file: Path | None = None
    status = 0
    try:
        settings = _preflight(settings)
        supervisor = Supervisor({}, settings.state_dir / "logs")
        settings = _start_backing_services(settings, supervisor)
        supervisor.env = service_env(settings)
        for child in service_children(settings, flower_port):
            supervisor.start(child)
        api_url = f"http://{settings.api_host}:{settings.api_port}"
        _wait_healthy(api_url, supervisor, 180, stop)
        if not stop.is_set():
            state_file = write_state_files(settings, supervisor.env, flower_port)
            print(
                f"nexusgen is up: API {api_url}  Flower {flower_url(settings, flower_port)}\n"
                f"  logs in {supervisor.log_dir}; admin environment: source {settings.state_dir / 'env'}\n"
                "  Ctrl-C stops everything.",
                flush=True,
            )
        status = _supervise(supervisor, stop)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        log.error("nexusgen up failed: %s", exc)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        status = 1
    finally:
        if state_file is not None:  # only ours: a refused second `up` leaves the running one's file alone
            state_file.unlink(missing_ok=True)
        if supervisor is not None:
            supervisor.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("nexusgen stopped")
    return status


def _preflight(settings: Settings) -> Settings:
    """Refuse a second `up` on this state dir and taken ports; check the configured URLs (step 1)."""
    check_not_running(settings.state_dir)
    check_ports(
        {
            "API": (settings.api_port, "NEXUSGEN_API_PORT"),
            "Flower": (settings.flower_port, "NEXUSGEN_FLOWER_PORT"),
        },
        settings.api_host,
    )
    return check_configured_urls(settings)


def _start_backing_services(settings: Settings, supervisor: Supervisor) -> Settings:
    """The embedded servers (first, so that they stop last), the model dir, the schema and the bucket."""
    settings, servers = embedded_children(settings, supervisor.log_dir)
    for server in servers:
        supervisor.start(server)
        log.info("embedded %s (log %s)", server.name, server.log_path)
    settings = prepare_model_dir(settings)
    from core.migrate import upgrade
    from core.storage import Storage

    upgrade(settings)
    Storage.from_settings(settings).ensure_bucket()
    log.info("database schema is up to date and bucket %s is there", settings.s3_bucket)
    return settings


def _supervise(supervisor: Supervisor, stop: threading.Event) -> int:
    """Watch the children until `stop` is set (0) or one keeps dying (1)."""
    while not stop.wait(0.5):
        if failing := supervisor.check():
            print(f"error: {failing.name} keeps dying; giving up and stopping the stack", file=sys.stderr)
            return 1
    return 0
