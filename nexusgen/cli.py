"""The `nexusgen` command line (design.md, Commands): the stack, single services, admin and client."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from core.settings import Settings


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc


def _service_settings() -> Settings:
    """Settings of a production service process: also refuse empty or placeholder secrets."""
    from core.secrets import refuse_weak_secrets

    settings = _settings()
    try:
        refuse_weak_secrets(settings)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    return settings


# The batch file format, in `nexusgen --help` and `nexusgen submit --help`; lines after the first are
# indented as the docstrings' raw text.
JSONL_EXAMPLE = """{"custom_id": "fox", "task": "generate", "prompt": "a red fox",
       "params": {"width": 512, "height": 512, "steps": 28, "seed": 1}}
      {"custom_id": "night", "task": "edit", "instruction": "make it night",
       "image": "data:image/png;base64,...", "params": {"decoder": "edit"}}
      {"custom_id": "what", "task": "understand", "instruction": "What is shown?",
       "image": "upl_..."}"""


def _with_jsonl_example(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Put JSONL_EXAMPLE into the docstring (click's help text) where it says {jsonl_example}."""
    fn.__doc__ = (fn.__doc__ or "").replace("{jsonl_example}", JSONL_EXAMPLE)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@_with_jsonl_example
def main() -> None:
    """Nexus-Gen V2 batch service: the stack, single services, administration and a client.

    \b
    Where commands find the stack (environment variables):
      DATABASE_URL, CELERY_BROKER_URL, S3_ENDPOINT_URL  services; unset: `up` starts embedded ones,
          and admin commands (tenant, key) use those of the `up` running on NEXUSGEN_STATE_DIR
      NEXUSGEN_STATE_DIR   state of `up` (default .nexusgen): data, logs, env, up.json
      NEXUSGEN_API_URL     API of the client commands (unset: the running `up`'s, else
                           http://127.0.0.1:8080)
      NEXUSGEN_API_KEY     key of the client commands (`nexusgen key create --tenant NAME`)
      NEXUSGEN_MODEL_DIR   weights (unset: a tiny random checkpoint under the state dir)
    Every other setting is listed in README.md, "Configuration".

    \b
    A batch file for `submit` is JSONL, one job per line, each with a unique custom_id:
      {jsonl_example}
    """


# --- the whole stack ----------------------------------------------------------------------------------


@main.command()
def up() -> None:
    """Run the whole stack in the foreground; start embedded servers for unset URLs. Ctrl-C stops it."""
    from nexusgen.up import run_up

    sys.exit(run_up(_settings()))


@main.command()
@click.option(
    "--out", "out_dir", type=click.Path(path_type=Path), default=Path("demo-output"), show_default=True
)
@click.option("--jobs", "n_jobs", type=int, default=8, show_default=True, help="how many jobs (at least 6)")
@click.option("--size", type=int, default=256, show_default=True, help="output width and height")
@click.option("--steps", type=int, default=4, show_default=True, help="denoising steps")
@click.option("--timeout", "timeout_s", type=float, default=900.0, show_default=True)
def demo(out_dir: Path, n_jobs: int, size: int, steps: int, timeout_s: float) -> None:
    """Run the stack in the background and push a mixed batch through it end to end."""
    from nexusgen.demo import DemoOptions, run_demo

    options = DemoOptions(out_dir=out_dir, n_jobs=n_jobs, size=size, steps=steps, timeout_s=timeout_s)
    sys.exit(run_demo(_settings(), options))


# --- one service each (docker-compose) ----------------------------------------------------------------


@main.command()
def migrate() -> None:
    """Bring the database schema up to date (Alembic)."""
    from core.migrate import upgrade
    from nexusgen.services import configure_logging

    settings = _service_settings()
    configure_logging("migrate", settings.log_level)
    settings.require("database_url")
    upgrade(settings)
    click.echo("database schema is up to date")
    if settings.s3_endpoint_url:
        from core.storage import Storage

        Storage.from_settings(settings).ensure_bucket()
        click.echo(f"bucket {settings.s3_bucket} is there")


@main.command()
@click.option("--workers", type=int, default=2, show_default=True, help="gunicorn worker processes")
@click.option(
    "--threads",
    type=int,
    default=64,
    show_default=True,
    help="threads per worker; each open event stream holds one (keep above NEXUSGEN_MAX_EVENT_STREAMS)",
)
def api(workers: int, threads: int) -> None:
    """Serve the HTTP API with gunicorn on NEXUSGEN_API_HOST:NEXUSGEN_API_PORT."""
    from nexusgen.services import configure_logging, serve_api

    settings = _service_settings()
    configure_logging("api", settings.log_level)
    settings.require("database_url", "broker_url", "s3_endpoint_url")
    serve_api(settings, workers=workers, threads=threads)


@main.command()
@click.option(
    "--webhooks", is_flag=True, help="serve webhook delivery and maintenance instead of the model queues"
)
@click.option(
    "--concurrency", type=int, default=None, help="processes (default: 1 for models, 4 for webhooks)"
)
@click.option("--hostname", default=None, help="Celery node name (default: kind@host)")
def worker(webhooks: bool, concurrency: int | None, hostname: str | None) -> None:
    """Run a Celery worker: the model queues of NEXUSGEN_TASKS, or (--webhooks) delivery and maintenance."""
    from core.queue import MAINTENANCE_QUEUE, MODEL_QUEUES, WEBHOOK_QUEUE
    from nexusgen.services import configure_logging, keep_celery_logging

    kind = "webhooks" if webhooks else "model"
    settings = _service_settings()
    configure_logging(f"worker-{kind}", settings.log_level)
    keep_celery_logging()
    settings.require("database_url", "broker_url", "s3_endpoint_url")
    queues = [WEBHOOK_QUEUE, MAINTENANCE_QUEUE] if webhooks else [MODEL_QUEUES[t] for t in settings.tasks]
    if not webhooks:
        from worker.execute import check_speed_options

        try:  # e.g. NEXUSGEN_DIT_PRECISION=fp8 on a CPU: refuse now, not at the first job
            check_speed_options(settings)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
    from worker.app import run_worker

    run_worker(
        settings,
        queues=queues,
        concurrency=concurrency or (4 if webhooks else 1),
        hostname=hostname,
        preload_model=not webhooks,
    )


@main.command()
def beat() -> None:
    """Run Celery beat: the periodic sweeper and the webhook outbox poll."""
    from nexusgen.services import configure_logging, keep_celery_logging

    settings = _service_settings()
    configure_logging("beat", settings.log_level)
    keep_celery_logging()
    settings.require("broker_url")
    from worker.app import run_beat

    run_beat(settings)


@main.command()
@click.option("--address", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=None, help="default: NEXUSGEN_FLOWER_PORT (5555)")
@click.option(
    "--db", "db_path", type=click.Path(path_type=Path), default=None, help="default: STATE_DIR/flower.db"
)
def flower(address: str, port: int | None, db_path: Path | None) -> None:
    """Run Flower (Celery monitoring) against CELERY_BROKER_URL, with persistent state."""
    from nexusgen.services import run_flower

    settings = _service_settings()
    settings.require("broker_url")
    port = port or settings.flower_port
    run_flower(settings, address=address, port=port, db_path=db_path or settings.state_dir / "flower.db")


# --- administration -----------------------------------------------------------------------------------


@main.group()
def tenant() -> None:
    """Tenants (each with its own keys, jobs and webhook signing secret)."""


def _engine() -> Any:
    """An engine on DATABASE_URL, or on the database of the running `nexusgen up` when it is unset."""
    import os

    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    from core.db import make_engine
    from nexusgen.stack import StackError, discover, require_answering, state_dir

    try:
        found = discover(("DATABASE_URL",))
        environ = {**os.environ, **found.env}
        url = environ.get("DATABASE_URL")
        if not url:
            raise StackError(
                f"DATABASE_URL is not set and no `nexusgen up` runs on {state_dir(environ)} "
                "(NEXUSGEN_STATE_DIR): start `.venv/bin/nexusgen up`, or set DATABASE_URL"
            )
        require_answering("DATABASE_URL", url, found.source)
        settings = Settings.from_env(environ)
        engine = make_engine(settings, pool_size=1)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except StackError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except SQLAlchemyError as exc:
        first = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        raise click.ClickException(f"DATABASE_URL: the database refused us: {first}") from None
    return engine


@tenant.command("create")
@click.argument("name")
def tenant_create(name: str) -> None:
    """Create a tenant; print its id and webhook signing secret."""
    from core.auth import create_tenant
    from core.db import transaction

    engine = _engine()
    try:
        with transaction(engine) as conn:
            tenant_id, secret = create_tenant(conn, name)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    finally:
        engine.dispose()
    click.echo(f"tenant_id: {tenant_id}")
    click.echo(f"webhook_secret: {secret}")


@tenant.command("rotate-secret")
@click.argument("name")
@click.option(
    "--overlap", "overlap_s", type=float, default=86400, show_default=True, help="old secret stays valid"
)
def tenant_rotate_secret(name: str, overlap_s: float) -> None:
    """Give a tenant a new webhook signing secret (the old one keeps signing during the overlap)."""
    from core.auth import tenant_id_by_name
    from core.db import transaction
    from core.webhooks import rotate_secret

    engine = _engine()
    try:
        with transaction(engine) as conn:
            secret = rotate_secret(conn, tenant_id_by_name(conn, name), overlap_s=overlap_s)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    finally:
        engine.dispose()
    click.echo(f"webhook_secret: {secret}")


@tenant.command("set-limits")
@click.argument("name")
@click.option("--max-queued", type=click.IntRange(min=0), default=None, help="most queued jobs (0: no limit)")
@click.option(
    "--submit-per-minute",
    type=click.IntRange(min=0),
    default=None,
    help="job/batch submissions a minute (0: no limit)",
)
@click.option(
    "--max-running", type=click.IntRange(min=0), default=None, help="most running jobs (0: no limit)"
)
@click.option(
    "--result-ttl",
    "result_ttl_s",
    type=click.IntRange(min=1),
    default=None,
    help="seconds results and inputs are kept (default: NEXUSGEN_RESULT_TTL_S)",
)
@click.option("--default", "reset", multiple=True, help="go back to the setting's default for this limit")
def tenant_set_limits(
    name: str,
    max_queued: int | None,
    submit_per_minute: int | None,
    max_running: int | None,
    result_ttl_s: int | None,
    reset: tuple[str, ...],
) -> None:
    """Set a tenant's limits; print them all (unset ones follow the settings). Over a limit, submissions
    get 429 and nothing is created; max-running applies when workers claim jobs."""
    from core.auth import tenant_id_by_name
    from core.db import transaction
    from core.limits import LIMIT_NAMES, set_limits, tenant_limits

    unknown = sorted(set(reset) - set(LIMIT_NAMES))
    if unknown:
        raise click.UsageError(f"--default takes {', '.join(LIMIT_NAMES)}; not {', '.join(unknown)}")
    changes: dict[str, int | None] = dict.fromkeys(reset)
    given = {
        "max_queued": max_queued,
        "submit_per_minute": submit_per_minute,
        "max_running": max_running,
        "result_ttl_s": result_ttl_s,
    }
    changes.update({limit: value for limit, value in given.items() if value is not None})
    settings = _settings()
    engine = _engine()
    try:
        with transaction(engine) as conn:
            tenant_id = tenant_id_by_name(conn, name)
            set_limits(conn, tenant_id, changes)
            limits = tenant_limits(conn, tenant_id, settings)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    finally:
        engine.dispose()
    for limit, (value, own) in limits.items():
        click.echo(f"{limit}: {value}" + ("" if own else " (default)"))


@main.command()
@click.option("--tenant", "tenant_name", required=True, help="tenant name")
@click.option("--from", "start", default=None, help="ISO date or date-time (default: 30 days before --to)")
@click.option("--to", "end", default=None, help="ISO date or date-time, exclusive (default: now)")
@click.option("--group-by", type=click.Choice(["day", "task"]), default="day", show_default=True)
def usage(tenant_name: str, start: str | None, end: str | None, group_by: str) -> None:
    """Print a tenant's usage (jobs, model seconds, images, steps, pixels, tokens) as JSON."""
    from datetime import UTC, datetime, timedelta

    from core.auth import tenant_id_by_name
    from core.usage import COUNTERS, summarize

    def when(value: str) -> datetime:
        parsed = datetime.fromisoformat(value)
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)

    try:
        until = when(end) if end else datetime.now(UTC)
        since = when(start) if start else until - timedelta(days=30)
    except ValueError as exc:
        raise click.UsageError(f"--from/--to: {exc}") from exc
    engine = _engine()
    try:
        with engine.connect() as conn:
            rows = summarize(conn, tenant_id_by_name(conn, tenant_name), since, until, group_by)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    finally:
        engine.dispose()
    total = {"jobs": sum(r["jobs"] for r in rows), **{n: sum(r[n] for r in rows) for n in COUNTERS}}
    report = {"tenant": tenant_name, "from": since.isoformat(), "to": until.isoformat(), "data": rows}
    click.echo(json.dumps({**report, "group_by": group_by, "total": total}, indent=2))


@main.group()
def key() -> None:
    """API keys (only their hash is stored)."""


@key.command("create")
@click.option("--tenant", "tenant_name", required=True, help="tenant name")
@click.option("--scopes", default="submit,read", show_default=True, help="comma list of submit, read, admin")
def key_create(tenant_name: str, scopes: str) -> None:
    """Create an API key and print it once."""
    from core.auth import create_api_key
    from core.db import transaction

    scope_list = [s.strip() for s in scopes.split(",") if s.strip()]
    engine = _engine()
    try:
        with transaction(engine) as conn:
            api_key = create_api_key(conn, tenant_name, scope_list)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    finally:
        engine.dispose()
    click.echo(api_key)


@main.command("make-tiny-checkpoint")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
def make_tiny_checkpoint(directory: Path, seed: int) -> None:
    """Write a tiny random checkpoint in the official layout (DIR/Nexus-GenV2, DIR/FLUX/FLUX.1-dev)."""
    from model.tiny import write_tiny_checkpoint

    write_tiny_checkpoint(directory, seed=seed)
    click.echo(f"tiny checkpoint written to {directory}")


@main.command()
@click.option("--tasks", default="generate,edit,understand", show_default=True, help="comma list")
@click.option("--tp", type=int, default=1, show_default=True, help="tensor-parallel size (devices)")
@click.option("--dtype", default="bf16", show_default=True, help="bf16, fp16 or fp32")
@click.option("--fp8-dit", is_flag=True, help="DiT block weights in float8")
@click.option("--resident-text-encoders", is_flag=True, help="keep CLIP and T5 on the device")
@click.option("--model-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None)
@click.option("--reference-sizes", is_flag=True, help="the published Nexus-GenV2 + FLUX.1-dev shapes")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
def plan(
    tasks: str,
    tp: int,
    dtype: str,
    fp8_dit: bool,
    resident_text_encoders: bool,
    model_dir: Path | None,
    reference_sizes: bool,
    as_json: bool,
) -> None:
    """Print the bytes each component keeps on each device, from shapes only (no weight is loaded)."""
    from model.plan import checkpoint_tensors, format_plan, make_plan, reference_tensors

    if (model_dir is None) == (not reference_sizes):
        raise click.UsageError("give exactly one of --model-dir DIR and --reference-sizes")
    try:
        tensors = reference_tensors() if reference_sizes else checkpoint_tensors(model_dir)  # type: ignore[arg-type]
        result = make_plan(
            tensors,
            [t.strip() for t in tasks.split(",") if t.strip()],
            tp=tp,
            dtype=dtype,
            fp8_dit=fp8_dit,
            resident_text_encoders=resident_text_encoders,
            source="reference" if reference_sizes else str(model_dir),
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(json.dumps(result.to_json(), indent=2) if as_json else format_plan(result))


# --- client -------------------------------------------------------------------------------------------


def _client() -> Any:
    """A client of NEXUSGEN_API_URL, or of the running `nexusgen up`'s API when it is unset."""
    import os

    from nexusgen.client import Client
    from nexusgen.stack import StackError, discover, require_answering

    try:
        found = discover(("NEXUSGEN_API_URL",))
        environ = {**os.environ, **found.env}
        client = Client.from_env(environ)
        require_answering("NEXUSGEN_API_URL", client.base_url, found.source)
    except StackError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return client


@contextmanager
def _api_errors() -> Iterator[None]:
    """API error answers and unreachable servers end the command with a one-line message."""
    import httpx

    from nexusgen.client import ApiError

    try:
        yield
    except ApiError as exc:
        raise click.ClickException(str(exc)) from exc
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach the API: {exc} (check NEXUSGEN_API_URL)") from exc


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--wait", is_flag=True, help="wait until every job ended, with a progress bar")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None, help="download results here")
@click.option(
    "--webhook", "webhook_url", default=None, help="the batch's webhook URL (job.* and batch.completed)"
)
@click.option(
    "--webhook-events",
    default=None,
    help="comma list of events for --webhook (default: all but job.progress)",
)
@_with_jsonl_example
def submit(
    file: Path, wait: bool, out_dir: Path | None, webhook_url: str | None, webhook_events: str | None
) -> None:
    """Submit FILE.jsonl as one batch (resubmitting the same file resumes the same batch).

    \b
    FILE.jsonl holds one job per line, each with a unique custom_id, e.g.
      {jsonl_example}
    task: generate (prompt), edit and understand (instruction, image);
    image: an upload id (POST /v1/uploads) or a data URL; params as in POST /v1/jobs.

    \b
    Environment:
      NEXUSGEN_API_KEY   required (`nexusgen key create --tenant NAME`)
      NEXUSGEN_API_URL   unset: the API of the `up` running on NEXUSGEN_STATE_DIR
                         (default .nexusgen), else http://127.0.0.1:8080
    """
    from nexusgen.progress import wait_for_batch

    if webhook_events and not webhook_url:
        raise click.UsageError("--webhook-events needs --webhook")
    client = _client()
    body = file.read_bytes()
    events = [e.strip() for e in webhook_events.split(",") if e.strip()] if webhook_events else None
    # The same file (and webhook) gives the same Idempotency-Key: a rerun finds its batch instead of
    # creating another.
    digest = hashlib.sha256(body)
    if webhook_url:
        digest.update(b"\0" + webhook_url.encode() + b"\0" + ",".join(events or []).encode())
    idempotency_key = "submit-" + digest.hexdigest()
    with _api_errors():
        batch = client.create_batch_jsonl(
            body, idempotency_key=idempotency_key, webhook_url=webhook_url, webhook_events=events
        )
        click.echo(f"batch_id: {batch['id']}")
        if not (wait or out_dir):
            return
        jobs = wait_for_batch(client, batch["id"], timeout_s=float("inf"))
        failed = [j for j in jobs if j["status"] != "succeeded"]
        if out_dir:
            fetched = skipped = 0
            for job in jobs:
                if job["status"] == "succeeded":
                    _, downloaded = client.download_result(job, out_dir)
                    fetched += downloaded
                    skipped += not downloaded
            click.echo(f"results in {out_dir}: {fetched} downloaded, {skipped} already there")
        for job in failed:
            error = job.get("error") or {}
            click.echo(
                f"{job.get('custom_id') or job['id']}: {job['status']} {error.get('message', '')}", err=True
            )
    sys.exit(1 if failed else 0)


@main.command()
@click.argument("object_id")
@click.option("--watch", is_flag=True, help="follow the live event stream until the job or batch ends")
def status(object_id: str, watch: bool) -> None:
    """Show a job or a batch (bat_...) as JSON; --watch prints each status change as it happens."""
    client = _client()
    if not watch:
        with _api_errors():
            click.echo(json.dumps(client.get(object_id), indent=2, ensure_ascii=False))
        return
    final = None
    with _api_errors():
        for event in client.watch(object_id):
            click.echo(describe_event(event.event, event.data))
            if event.event == "end":
                final = event.data.get("status")
    sys.exit(0 if final in ("succeeded", "completed") else 1)


def describe_event(kind: str, data: dict[str, Any]) -> str:
    """One line per stream event: `job_... running denoising 3/8`, `job_... queued (position 4)`."""
    who = data.get("job_id") or data.get("batch_id")
    if kind == "queue":
        return f"{who} queued (position {data['queue_position']})"
    if kind == "end":
        return f"{who} ended: {data['status']}"
    step = f" {data['step']}/{data['total_steps']}" if data.get("step") is not None else ""
    return f"{who} {data['status']} {data['stage']}{step}"


@main.command()
@click.argument("object_id")
def cancel(object_id: str) -> None:
    """Cancel a job or a batch (bat_...); finished jobs keep their results."""
    with _api_errors():
        click.echo(json.dumps(_client().cancel(object_id), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
