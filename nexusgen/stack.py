"""Find the stack a command talks to: configured URLs, or the running `nexusgen up` of the state dir.

Admin and client commands with DATABASE_URL / NEXUSGEN_API_URL unset read STATE_DIR/up.json, which a
live `up` writes and removes; every failure to find or reach a service is one line (StackError) that
names the variable or file to fix, never a traceback.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from nexusgen.embedded import pid_alive

# service URL variables and what answers there
SERVICE_NAMES = {
    "DATABASE_URL": "PostgreSQL",
    "CELERY_BROKER_URL": "the broker",
    "S3_ENDPOINT_URL": "S3",
    "NEXUSGEN_API_URL": "the API",
}
DEFAULT_PORTS = {"postgresql": 5432, "redis": 6379, "amqp": 5672, "http": 80, "https": 443}


class StackError(RuntimeError):
    """The stack cannot be found or does not answer; the message says what to set or start."""


@dataclass(frozen=True)
class Discovered:
    """Environment variables taken from a running `up`, and the file they came from."""

    env: dict[str, str]
    source: Path | None  # None: nothing was taken from the state dir


def state_dir(environ: Mapping[str, str]) -> Path:
    """NEXUSGEN_STATE_DIR, read like every setting through core/settings.py."""
    from core.settings import Settings

    return Settings.from_env(environ).state_dir


def read_running_up(directory: Path) -> dict[str, object] | None:
    """The up.json of a live `up` on `directory`; None when there is none. A stale file is an error."""
    path = directory / "up.json"
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text())
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StackError(f"{path} is unreadable ({exc}); remove it and start `nexusgen up`") from exc
    if not pid_alive(pid):
        raise StackError(
            f"{path} was left by a `nexusgen up` (pid {pid}) that is gone; start `.venv/bin/nexusgen up` "
            "again, or set the service URLs"
        )
    return dict(info)


def discover(needed: tuple[str, ...], environ: Mapping[str, str] | None = None) -> Discovered:
    """Fill the variables in `needed` that are unset from the running `up` of the state dir (if any)."""
    env = os.environ if environ is None else environ
    missing = [name for name in needed if not env.get(name)]
    if not missing:
        return Discovered({}, None)
    directory = state_dir(env)
    info = read_running_up(directory)
    if info is None:
        return Discovered({}, None)
    exported = dict(info.get("env") or {})  # type: ignore[call-overload]
    taken = {name: str(exported[name]) for name in missing if exported.get(name)}
    return Discovered(taken, directory / "up.json" if taken else None)


def address(url: str) -> tuple[str, int]:
    """Host and port of a service URL (the scheme's default port when none is given)."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+")[0]
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    return parts.hostname, parts.port or DEFAULT_PORTS.get(scheme, 80)


def answers(url: str, timeout_s: float = 2.0) -> str | None:
    """None when something accepts TCP connections at the URL's address, else why not."""
    try:
        host, port = address(url)
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except (OSError, ValueError) as exc:
        return str(exc) or type(exc).__name__


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def require_answering(name: str, url: str, source: Path | None) -> None:
    """Raise StackError naming the variable (and the file it came from) when nothing answers at `url`."""
    why = answers(url)
    if why is None:
        return
    origin = f" (taken from {source})" if source else ""
    hint = (
        f"; {source} belongs to an `up` that no longer serves it: restart `nexusgen up`"
        if source
        else f"; start that server, or unset {name} (if it came from a sourced .nexusgen/env: commands "
        "then find the running `nexusgen up` themselves, and `up` starts embedded servers)"
        if name != "NEXUSGEN_API_URL"
        else "; is `nexusgen up` or `nexusgen api` running there?"
    )
    raise StackError(f"{name}={redact(url)}{origin}: {SERVICE_NAMES[name]} does not answer ({why}){hint}")
