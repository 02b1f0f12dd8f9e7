"""The admin commands of the CLI against the real test database, and the client commands' checks."""

from __future__ import annotations

import base64
import json
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, select

from core.auth import authenticate
from core.schema import api_keys, tenants
from core.settings import Settings
from nexusgen.cli import main as cli


@pytest.fixture
def run(settings: Settings, engine: Engine) -> CliRunner:
    """A runner whose environment points the CLI at the test database (schema already migrated)."""
    return CliRunner(env={"DATABASE_URL": settings.database_url})


def _fields(output: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in output.splitlines() if ": " in line)


def test_tenant_create_prints_id_and_secret(run: CliRunner, engine: Engine) -> None:
    name = f"acme-{uuid.uuid4().hex[:8]}"
    result = run.invoke(cli, ["tenant", "create", name])
    assert result.exit_code == 0, result.output
    fields = _fields(result.output)
    assert fields["tenant_id"].startswith("ten_")
    assert fields["webhook_secret"].startswith("whsec_")
    with engine.connect() as conn:
        row = conn.execute(select(tenants).where(tenants.c.name == name)).mappings().one()
    assert (row["id"], row["webhook_secret"]) == (fields["tenant_id"], fields["webhook_secret"])


def test_tenant_create_twice_is_a_clear_error(run: CliRunner) -> None:
    name = f"dup-{uuid.uuid4().hex[:8]}"
    assert run.invoke(cli, ["tenant", "create", name]).exit_code == 0
    result = run.invoke(cli, ["tenant", "create", name])
    assert result.exit_code == 2
    assert "already exists" in result.output


def test_key_create_prints_a_key_that_authenticates_with_its_scopes(run: CliRunner, engine: Engine) -> None:
    name = f"keys-{uuid.uuid4().hex[:8]}"
    tenant_id = _fields(run.invoke(cli, ["tenant", "create", name]).output)["tenant_id"]
    result = run.invoke(cli, ["key", "create", "--tenant", name, "--scopes", "read"])
    assert result.exit_code == 0, result.output
    key = result.output.strip()
    with engine.connect() as conn:
        principal = authenticate(conn, key)
        query = select(api_keys.c.key_hash, api_keys.c.prefix).where(api_keys.c.tenant_id == tenant_id)
        stored = conn.execute(query).one()
    assert principal is not None and principal.tenant_id == tenant_id
    assert principal.allows("read") and not principal.allows("submit")
    assert key not in stored and key.startswith(stored.prefix)  # only the hash (and a prefix) is kept


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tenant", "no-such-tenant"], "no tenant named"),
        (["--scopes", "read,launch"], "scopes must be"),
    ],
)
def test_key_create_rejects_bad_input(run: CliRunner, args: list[str], message: str) -> None:
    name = f"bad-{uuid.uuid4().hex[:8]}"
    run.invoke(cli, ["tenant", "create", name])
    result = run.invoke(cli, ["key", "create", "--tenant", name, *args])
    assert result.exit_code == 2
    assert message in result.output


def test_rotate_secret_replaces_the_secret(run: CliRunner) -> None:
    name = f"rot-{uuid.uuid4().hex[:8]}"
    old = _fields(run.invoke(cli, ["tenant", "create", name]).output)["webhook_secret"]
    result = run.invoke(cli, ["tenant", "rotate-secret", name, "--overlap", "60"])
    assert result.exit_code == 0, result.output
    new = _fields(result.output)["webhook_secret"]
    assert new.startswith("whsec_") and new != old


def _one_line_error(result: Any) -> str:
    """The whole output of a failed command: a single `Error: ...` line, no traceback."""
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output
    return str(result.output)


def _write_up_json(state: Path, pid: int, env: dict[str, str]) -> None:
    state.mkdir(parents=True, exist_ok=True)
    (state / "up.json").write_text(json.dumps({"pid": pid, "env": env}))


def test_admin_commands_without_database_url_or_running_up_say_what_to_set(tmp_path: Path) -> None:
    env = {"DATABASE_URL": "", "NEXUSGEN_STATE_DIR": str(tmp_path / "state")}
    line = _one_line_error(CliRunner(env=env).invoke(cli, ["tenant", "create", "x"]))
    assert "DATABASE_URL" in line and "NEXUSGEN_STATE_DIR" in line and "nexusgen up" in line


def test_admin_commands_find_the_running_up_through_the_state_dir(
    settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    import os

    assert settings.database_url is not None
    _write_up_json(tmp_path / "state", os.getpid(), {"DATABASE_URL": settings.database_url})
    runner = CliRunner(env={"DATABASE_URL": "", "NEXUSGEN_STATE_DIR": str(tmp_path / "state")})
    name = f"found-{uuid.uuid4().hex[:8]}"
    result = runner.invoke(cli, ["tenant", "create", name])
    assert result.exit_code == 0, result.output
    assert _fields(result.output)["tenant_id"].startswith("ten_")


def test_stale_or_dead_configuration_is_one_line_naming_the_file_or_variable(tmp_path: Path) -> None:
    from nexusgen.embedded import free_port

    dead_port = free_port()
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    state = tmp_path / "state"
    _write_up_json(state, dead_pid, {"DATABASE_URL": f"postgresql://postgres@127.0.0.1:{dead_port}/x"})
    stale = CliRunner(env={"DATABASE_URL": "", "NEXUSGEN_STATE_DIR": str(state)})
    line = _one_line_error(stale.invoke(cli, ["tenant", "create", "x"]))
    assert str(state / "up.json") in line and str(dead_pid) in line

    dead_url = f"postgresql+psycopg://nexusgen:s3cret@127.0.0.1:{dead_port}/nexusgen"
    configured = CliRunner(env={"DATABASE_URL": dead_url, "NEXUSGEN_STATE_DIR": str(state)})
    line = _one_line_error(configured.invoke(cli, ["key", "create", "--tenant", "x"]))
    assert line.startswith("Error: DATABASE_URL=") and "s3cret" not in line and "does not answer" in line

    client = CliRunner(
        env={"NEXUSGEN_API_URL": "", "NEXUSGEN_API_KEY": "k", "NEXUSGEN_STATE_DIR": str(state)}
    )
    line = _one_line_error(client.invoke(cli, ["status", "job_x"]))
    assert str(state / "up.json") in line


@pytest.mark.parametrize("args", [["status", "job_x"], ["cancel", "job_x"]])
def test_client_commands_need_an_api_key(args: list[str], tmp_path: Path) -> None:
    result = CliRunner(env={"NEXUSGEN_API_KEY": "", "NEXUSGEN_STATE_DIR": str(tmp_path)}).invoke(cli, args)
    assert result.exit_code == 2
    assert "NEXUSGEN_API_KEY" in result.output


def test_make_tiny_checkpoint_writes_the_official_layout(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["make-tiny-checkpoint", str(tmp_path / "ckpt")])
    assert result.exit_code == 0, result.output
    ar, flux = tmp_path / "ckpt" / "Nexus-GenV2", tmp_path / "ckpt" / "FLUX" / "FLUX.1-dev"
    assert (ar / "generation_decoder.bin").is_file() and (ar / "edit_decoder.bin").is_file()
    assert list(ar.glob("*.safetensors")) and (flux / "ae.safetensors").is_file()


def test_service_logs_are_json_lines_with_job_and_batch_ids(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    from nexusgen.services import configure_logging

    configure_logging("worker-model", "INFO")
    try:
        logging.getLogger("worker.test").info("claimed", extra={"job_id": "job_1", "batch_id": "bat_1"})
    finally:
        logging.getLogger().handlers.clear()
    record = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert record["message"] == "claimed" and record["level"] == "INFO"
    assert (record["service"], record["job_id"], record["batch_id"]) == ("worker-model", "job_1", "bat_1")


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"HTTP_REFERER": "https://example.com/a", "HTTP_USER_AGENT": "curl/8.5", "QUERY_STRING": "a=1"},
        {"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(b"ops:pw").decode()},
    ],
)
def test_the_api_access_line_is_gunicorns_own(extra: dict[str, str], tmp_path: Path) -> None:
    """AccessLogger writes, for the default format, the very line gunicorn's Logger writes."""
    from datetime import timedelta
    from types import SimpleNamespace

    from gunicorn.config import Config
    from gunicorn.glogging import Logger

    from nexusgen.services import AccessLogger

    environ = {"REQUEST_METHOD": "GET", "RAW_URI": "/v1/jobs/job_1?a=1", "PATH_INFO": "/v1/jobs/job_1",
               "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "10.0.0.7", **extra}  # fmt: skip

    for cls, sent in ((Logger, 610), (AccessLogger, 610), (Logger, None), (AccessLogger, None)):
        cfg = Config()
        cfg.set("accesslog", str(tmp_path / "access.log"))
        logger = cls(cfg)
        resp = SimpleNamespace(status="200 OK", sent=sent, headers=[("Content-Type", "application/json")])
        req = SimpleNamespace(headers=[("HOST", "api")])
        logger.access(resp, req, environ, timedelta(microseconds=2500))
        for handler in logger.access_log.handlers:
            handler.close()
        logger.access_log.handlers.clear()
    lines = (tmp_path / "access.log").read_text().splitlines()
    assert len(lines) == 4
    plain = [re.sub(r"\[[^]]+\]", "[time]", line) for line in lines]  # the two may straddle a second
    assert plain[0] == plain[1] and plain[2] == plain[3], plain
    assert '"GET /v1/jobs/job_1?a=1 HTTP/1.1" 200 610' in plain[0] and '" 200 - "' in plain[2]


@pytest.fixture
def api_url(settings: Settings, engine: Engine) -> Iterator[str]:
    """The real API app on a loopback port (no workers: jobs stay queued until canceled)."""
    from werkzeug.serving import make_server

    from api.app import create_app

    server = make_server("127.0.0.1", 0, create_app(settings), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()


def test_client_commands_submit_status_cancel(run: CliRunner, api_url: str, tmp_path: Path) -> None:
    name = f"client-{uuid.uuid4().hex[:8]}"
    run.invoke(cli, ["tenant", "create", name])
    key = run.invoke(cli, ["key", "create", "--tenant", name]).output.strip()
    client = CliRunner(env={"NEXUSGEN_API_URL": api_url, "NEXUSGEN_API_KEY": key})
    jobs = tmp_path / "jobs.jsonl"
    lines = [
        {"custom_id": f"c{i}", "task": "generate", "prompt": "a cat", "params": {"steps": 2}}
        for i in range(3)
    ]
    jobs.write_text("\n".join(json.dumps(line) for line in lines))

    first = client.invoke(cli, ["submit", str(jobs)])
    assert first.exit_code == 0, first.output
    batch_id = _fields(first.output)["batch_id"]
    assert _fields(client.invoke(cli, ["submit", str(jobs)]).output)["batch_id"] == batch_id  # resumed
    status = json.loads(client.invoke(cli, ["status", batch_id]).output)
    assert status["counts"]["queued"] == 3
    assert client.invoke(cli, ["cancel", batch_id]).exit_code == 0
    # every job ended (canceled): --wait returns at once, nothing to download, and the exit status says so
    waited = client.invoke(cli, ["submit", str(jobs), "--wait", "--out", str(tmp_path / "out")])
    assert waited.exit_code == 1
    assert "0 downloaded, 0 already there" in waited.output and "c0: canceled" in waited.output

    jobs.write_text('{"custom_id": "bad", "task": "paint"}\n')
    bad = client.invoke(cli, ["submit", str(jobs)])
    assert bad.exit_code == 1 and "422" in bad.output


def test_client_commands_find_the_api_of_the_running_up(run: CliRunner, api_url: str, tmp_path: Path) -> None:
    import os

    name = f"found-{uuid.uuid4().hex[:8]}"
    run.invoke(cli, ["tenant", "create", name])
    key = run.invoke(cli, ["key", "create", "--tenant", name]).output.strip()
    _write_up_json(tmp_path / "state", os.getpid(), {"NEXUSGEN_API_URL": api_url})
    env = {"NEXUSGEN_API_URL": "", "NEXUSGEN_API_KEY": key, "NEXUSGEN_STATE_DIR": str(tmp_path / "state")}
    result = CliRunner(env=env).invoke(cli, ["status", "job_nothere"])
    assert result.exit_code == 1 and "HTTP 404 not_found" in result.output, result.output


def _help_jobs(text: str) -> list[dict[str, object]]:
    """The JSONL example lines of a help text (an object may continue on indented lines)."""
    jobs, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("{") or (current and stripped.startswith('"')):
            current += " " + stripped
            try:
                jobs.append(json.loads(current))
                current = ""
            except json.JSONDecodeError:
                continue
    return jobs


@pytest.mark.parametrize("args", [["--help"], ["submit", "--help"]])
def test_help_names_the_environment_and_a_jsonl_format_the_api_accepts(args: list[str]) -> None:
    import base64
    import io

    from PIL import Image

    from core.submit import validate_job

    text = CliRunner().invoke(cli, args).output
    for name in ("NEXUSGEN_API_URL", "NEXUSGEN_API_KEY", "NEXUSGEN_STATE_DIR"):
        assert name in text, name
    jobs = _help_jobs(text)
    assert {job["task"] for job in jobs} == {"generate", "edit", "understand"}, jobs
    png = io.BytesIO()
    Image.new("RGB", (32, 32)).save(png, "PNG")
    data_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    for job in jobs:
        if job.get("image") == "data:image/png;base64,...":
            job["image"] = data_url
        validate_job(job, Settings(), require_custom_id=True)  # raises SubmitError on a bad example


def test_submit_with_webhook_sets_the_batch_webhook(run: CliRunner, api_url: str, tmp_path: Path) -> None:
    name = f"hook-{uuid.uuid4().hex[:8]}"
    run.invoke(cli, ["tenant", "create", name])
    key = run.invoke(cli, ["key", "create", "--tenant", name]).output.strip()
    client = CliRunner(env={"NEXUSGEN_API_URL": api_url, "NEXUSGEN_API_KEY": key})
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"custom_id": "c0", "task": "generate", "prompt": "a cat"}) + "\n")
    url = "http://127.0.0.1:9/hook"
    result = client.invoke(
        cli, ["submit", str(jobs), "--webhook", url, "--webhook-events", "batch.completed"]
    )
    assert result.exit_code == 0, result.output
    batch_id = _fields(result.output)["batch_id"]
    status = json.loads(client.invoke(cli, ["status", batch_id]).output)
    assert status["webhook"] == {"url": url, "events": ["batch.completed"]}
    # the same file without the webhook is another batch, not a replay of this one
    plain = client.invoke(cli, ["submit", str(jobs)])
    assert plain.exit_code == 0 and _fields(plain.output)["batch_id"] != batch_id
    client.invoke(cli, ["cancel", batch_id])


def test_tenant_set_limits_sets_and_resets_the_result_ttl(run: CliRunner, engine: Engine) -> None:
    name = f"limits-{uuid.uuid4().hex[:8]}"
    run.invoke(cli, ["tenant", "create", name])
    result = run.invoke(cli, ["tenant", "set-limits", name, "--result-ttl", "60"])
    assert result.exit_code == 0, result.output
    assert "result_ttl_s: 60\n" in result.output
    with engine.connect() as conn:
        assert conn.execute(select(tenants.c.result_ttl_s).where(tenants.c.name == name)).scalar_one() == 60
    reset = run.invoke(cli, ["tenant", "set-limits", name, "--default", "result_ttl_s"])
    assert reset.exit_code == 0 and f"result_ttl_s: {7 * 24 * 3600} (default)" in reset.output
    assert run.invoke(cli, ["tenant", "set-limits", name, "--result-ttl", "0"]).exit_code == 2
    assert run.invoke(cli, ["tenant", "set-limits", "no-such", "--result-ttl", "5"]).exit_code == 2
