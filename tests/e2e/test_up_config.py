"""`nexusgen up` and configured URLs: dead ones are refused in one line; its own embedded ports are kept."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from nexusgen import embedded
from tests.e2e.conftest import free_port, stack_env


def _up(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "nexusgen.cli", "up"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def test_up_refuses_a_configured_url_where_nothing_answers(tmp_path: Path) -> None:
    dead = free_port()
    for name, url in (
        ("DATABASE_URL", f"postgresql+psycopg://nexusgen:s3cret@127.0.0.1:{dead}/nexusgen"),
        ("CELERY_BROKER_URL", f"redis://127.0.0.1:{dead}/0"),
        ("S3_ENDPOINT_URL", f"http://127.0.0.1:{dead}"),
    ):
        result = _up(stack_env(tmp_path / "state", **{name: url}))
        assert result.returncode == 1
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
        assert errors[0].startswith(f"error: {name}=") and "does not answer" in errors[0]
        assert "s3cret" not in result.stderr
        assert not (tmp_path / "state" / "postgres").exists()  # refused before starting anything


def test_embedded_servers_keep_their_port_while_it_is_free(tmp_path: Path) -> None:
    first = embedded.remembered_port(tmp_path, "postgres")
    assert embedded.remembered_port(tmp_path, "postgres") == first
    assert embedded.remembered_port(tmp_path, "redis") != first
    with socket.socket() as taken:  # someone else took it meanwhile: a new port, remembered from now on
        taken.bind(("127.0.0.1", first))
        moved = embedded.remembered_port(tmp_path, "postgres")
    assert moved != first and embedded.remembered_ports(tmp_path)["postgres"] == moved


def test_up_refuses_its_own_embedded_url_when_another_process_holds_that_port(tmp_path: Path) -> None:
    state = tmp_path / "state"
    port = embedded.remembered_port(state, "redis")  # as a previous `up` on this state dir left it
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        result = _up(stack_env(state, CELERY_BROKER_URL=f"redis://127.0.0.1:{port}/0"))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "CELERY_BROKER_URL names the embedded redis" in errors[0], result.stderr
    assert "unset CELERY_BROKER_URL" in errors[0]


def test_a_sourced_env_naming_the_state_dirs_own_servers_counts_as_unset(tmp_path: Path) -> None:
    from core.settings import Settings
    from nexusgen.up import check_configured_urls

    state = tmp_path / "state"
    pg, s3 = embedded.remembered_port(state, "postgres"), embedded.remembered_port(state, "s3")
    sourced = Settings(
        database_url=f"postgresql+psycopg://postgres@127.0.0.1:{pg}/nexusgen",
        s3_endpoint_url=f"http://127.0.0.1:{s3}",
        state_dir=state,
    )
    checked = check_configured_urls(sourced)
    # both are started again, embedded, on the same ports (up's start_embedded reads ports.json)
    assert checked.database_url is None and checked.s3_endpoint_url is None
    assert embedded.remembered_port(state, "postgres") == pg
