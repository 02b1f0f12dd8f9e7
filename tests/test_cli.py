"""The admin commands of the CLI against the real test database, and the client commands' checks."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

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


def test_admin_commands_need_database_url() -> None:
    result = CliRunner(env={"DATABASE_URL": ""}).invoke(cli, ["tenant", "create", "x"])
    assert result.exit_code == 2
    assert "DATABASE_URL" in result.output


@pytest.mark.parametrize("args", [["status", "job_x"], ["cancel", "job_x"]])
def test_client_commands_need_an_api_key(args: list[str]) -> None:
    result = CliRunner(env={"NEXUSGEN_API_KEY": ""}).invoke(cli, args)
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
