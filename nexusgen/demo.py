"""`nexusgen demo`: the stack in the background, a mixed batch end to end, verified webhooks, a summary.

Exit status 0 only when every job succeeded and every webhook arrived with a valid signature.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from rich.table import Table

from core.settings import Settings
from nexusgen.client import Client
from nexusgen.contact_sheet import RunSummary, seconds_between, task_label, write_contact_sheet
from nexusgen.progress import console, wait_for_batch

if TYPE_CHECKING:
    from nexusgen.receiver import WebhookReceiver


@dataclass
class DemoOptions:
    out_dir: Path = Path("demo-output")
    n_jobs: int = 8
    size: int = 256
    steps: int = 4
    timeout_s: float = 900.0


# --- inputs ---------------------------------------------------------------------------------------------


def make_input_images(size: int) -> dict[str, bytes]:
    """Two small PNGs drawn with PIL: shapes on a plain background, and a simple landscape."""
    from PIL import Image, ImageDraw

    shapes = Image.new("RGB", (size, size), (40, 70, 160))
    draw = ImageDraw.Draw(shapes)
    draw.ellipse((size * 0.15, size * 0.15, size * 0.55, size * 0.55), fill=(220, 40, 40))
    draw.rectangle((size * 0.55, size * 0.5, size * 0.9, size * 0.85), fill=(250, 210, 40))
    landscape = Image.new("RGB", (size, size), (140, 200, 250))
    draw = ImageDraw.Draw(landscape)
    draw.rectangle((0, size * 0.65, size, size), fill=(60, 150, 60))
    draw.ellipse((size * 0.7, size * 0.1, size * 0.9, size * 0.3), fill=(255, 230, 80))
    draw.polygon(
        [(size * 0.1, size * 0.65), (size * 0.35, size * 0.3), (size * 0.6, size * 0.65)],
        fill=(120, 110, 100),
    )
    images = {}
    for name, image in (("shapes", shapes), ("landscape", landscape)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        images[name] = buffer.getvalue()
    return images


def _gen(prompt: str, language: str) -> dict[str, Any]:
    return {"task": "generate", "prompt": prompt, "params": {"language": language}}


def _edit(instruction: str, image: str, decoder: str, language: str) -> dict[str, Any]:
    params = {"decoder": decoder, "language": language}
    return {"task": "edit", "instruction": instruction, "image": image, "params": params}


def _understand(instruction: str, image: str) -> dict[str, Any]:
    # A short answer: the tiny random model writes noise tokens, and each one costs a forward pass.
    return {
        "task": "understand",
        "instruction": instruction,
        "image": image,
        "params": {"max_new_tokens": 16},
    }


def demo_jobs(uploads: dict[str, str], options: DemoOptions) -> list[dict[str, Any]]:
    """A mix of generation (EN, ZH), editing (both decoders) and understanding, cycled to n_jobs."""
    size = {"width": options.size, "height": options.size, "steps": options.steps}
    shapes, landscape = uploads["shapes"], uploads["landscape"]
    mix: list[dict[str, Any]] = [
        _gen("A red fox sitting in fresh snow, watercolor", "en"),
        _gen("一只在竹林里吃竹子的大熊猫，水墨画风格", "zh"),
        _edit("Make the red circle green", shapes, "edit", "en"),
        _edit("Turn this landscape into a night scene", landscape, "generation", "en"),
        _understand("Describe this image in one sentence.", shapes),
        _gen("A lighthouse on a cliff at dusk, oil painting", "en"),
        _edit("把天空变成橙色的晚霞", landscape, "edit", "zh"),
        _understand("What shapes and colours do you see?", landscape),
    ]
    jobs = []
    for i in range(options.n_jobs):
        job = json.loads(json.dumps(mix[i % len(mix)]))
        if job["task"] != "understand":
            job["params"].update(size, seed=1000 + i)
        job["custom_id"] = f"{i:02d}-{job['task']}"
        jobs.append(job)
    return jobs


# --- the stack in the background ------------------------------------------------------------------------


def start_stack(settings: Settings, timeout_s: float) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start `nexusgen up` (private webhook targets allowed, for the loopback receiver); wait until ready."""
    state = settings.state_dir.resolve()
    (state / "logs").mkdir(parents=True, exist_ok=True)
    info_path = state / "up.json"  # a stale one (from a killed `up`) has another pid
    env = dict(os.environ, WEBHOOK_ALLOW_PRIVATE_NETWORKS="1", NEXUSGEN_STATE_DIR=str(state))
    with (state / "logs" / "up.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "nexusgen.cli", "up"], env=env, stdout=log, stderr=log
        )
    deadline = time.monotonic() + timeout_s
    with console.status("starting the stack (embedded servers, migrations, services) ..."):
        while True:
            if info_path.exists():
                info = json.loads(info_path.read_text())
                if info.get("pid") == process.pid:
                    return process, info
            if process.poll() is not None:
                tail = (state / "logs" / "up.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"`nexusgen up` exited with status {process.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                stop_stack(process)
                raise RuntimeError(f"the stack was not ready within {timeout_s:.0f} s (see {state / 'logs'})")
            time.sleep(0.5)


def stop_stack(process: subprocess.Popen[bytes], timeout_s: float = 90.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def create_demo_tenant(database_url: str) -> tuple[str, str, str]:
    """A fresh tenant (a name per run, since the state persists) and a key: (name, secret, api key)."""
    from core.auth import create_api_key, create_tenant
    from core.db import make_engine, transaction

    engine = make_engine(Settings(database_url=database_url), pool_size=1)
    name = f"demo-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    try:
        with transaction(engine) as conn:
            _, secret = create_tenant(conn, name)
            key = create_api_key(conn, name, ["submit", "read"])
    finally:
        engine.dispose()
    return name, secret, key


# --- outputs --------------------------------------------------------------------------------------------


def summary_table(
    jobs: list[dict[str, Any]], files: dict[str, Path], specs: dict[str, dict[str, Any]]
) -> Table:
    """One row per job; the two time columns split a job's life at the moment a worker claimed it."""
    table = Table(
        title="demo batch",
        caption="waited: from submission until a worker claimed the job (queue and batch mates); "
        "ran: from the claim to the stored result (jobs of one model call run together)",
    )
    for column in ("job", "task", "status", "waited s", "ran s", "output"):
        table.add_column(column)
    for job in jobs:
        waited = seconds_between(job.get("created_at"), job.get("started_at"))
        ran = seconds_between(job.get("started_at"), job.get("finished_at"))
        table.add_row(
            job.get("custom_id") or job["id"],
            task_label(job, specs.get(job.get("custom_id") or "", {})),
            job["status"],
            f"{waited:.1f}" if waited is not None else "-",
            f"{ran:.1f}" if ran is not None else "-",
            str(files.get(job["id"], (job.get("error") or {}).get("message", "-"))),
        )
    return table


# --- the demo -------------------------------------------------------------------------------------------


def run_demo(settings: Settings, options: DemoOptions) -> int:
    """Run the demo; return the exit status.

    1. start the stack; 2. a tenant with a key, and a webhook receiver verifying its signatures; 3. one
    batch, its results and its webhooks (`_run_batch`); 4. the contact sheet and the summary
    (`_report`); 5. stop the stack, whatever happened.
    """
    from nexusgen.receiver import WebhookReceiver

    began = time.monotonic()
    try:
        process, info = start_stack(settings, timeout_s=600)
    except RuntimeError as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        return 1
    try:
        stack_start_s = time.monotonic() - began
        console.print(
            f"stack ready in {stack_start_s:.0f} s: API {info['api_url']}, Flower {info['flower_url']}"
        )
        if settings.model_dir is None:
            console.print(
                "NEXUSGEN_MODEL_DIR is unset: a tiny random checkpoint serves this demo, so its images "
                "are noise and its answers random tokens (the service is what is shown)."
            )
        name, secret, key = create_demo_tenant(info["env"]["DATABASE_URL"])
        client = Client(info["api_url"], key)
        with WebhookReceiver(secret, path="/hooks") as receiver:
            batch = _run_batch(client, receiver, options, name)
        run = RunSummary(
            batch_id=batch.batch_id,
            tenant=name,
            submitted_at=batch.finished.get("created_at"),
            completed_at=batch.finished.get("completed_at"),
            stack_start_s=stack_start_s,
            webhooks_verified=len(batch.verified),
            webhooks_rejected=len(batch.rejected),
            webhooks_all_arrived=batch.arrived,
            tiny_model=settings.model_dir is None,
        )
        return _report(options, run, batch)
    except (RuntimeError, TimeoutError, OSError, httpx.HTTPError) as exc:  # ApiError is a RuntimeError
        console.print(f"[red]demo failed:[/red] {exc}")
        return 1
    finally:
        with console.status("stopping the stack ..."):
            stop_stack(process)
        console.print(f"stack stopped; total {time.monotonic() - began:.0f} s")


@dataclass
class BatchRun:
    """What the demo's batch gave: its jobs (sorted), their result files, and the webhooks received."""

    batch_id: str
    finished: dict[str, Any]  # the batch as the API shows it at the end
    done: list[dict[str, Any]]
    files: dict[str, Path]
    specs: dict[str, dict[str, Any]]  # custom id -> the job as submitted, its input image by file name
    arrived: bool
    verified: list[Any]
    rejected: list[Any]


def _run_batch(client: Client, receiver: WebhookReceiver, options: DemoOptions, name: str) -> BatchRun:
    """Upload the inputs (kept beside the outputs), submit one batch with webhooks to `receiver`, wait
    for it, download its results, then wait for every event the batch should have sent."""
    images = make_input_images(options.size)
    uploads = {label: client.upload(data, f"{label}.png") for label, data in images.items()}
    options.out_dir.mkdir(parents=True, exist_ok=True)
    for label, data in images.items():
        (options.out_dir / f"input-{label}.png").write_bytes(data)
    jobs = demo_jobs(uploads, options)
    batch = client.create_batch(jobs, webhook={"url": receiver.url}, metadata={"demo": name})
    console.print(f"tenant {name}: batch {batch['id']} with {len(jobs)} jobs; webhooks to {receiver.url}")
    done = wait_for_batch(client, batch["id"], timeout_s=options.timeout_s)
    done.sort(key=lambda job: job.get("custom_id") or job["id"])
    files: dict[str, Path] = {}
    for job in done:
        if job["status"] == "succeeded":
            files[job["id"]], _ = client.download_result(job, options.out_dir)
    input_names = {upload_id: f"input-{label}.png" for label, upload_id in uploads.items()}
    specs = {j["custom_id"]: {**j, "image": input_names.get(j.get("image", ""), "")} for j in jobs}
    expected = {(j["id"], "job." + j["status"]) for j in done} | {(batch["id"], "batch.completed")}

    def _all_arrived(events: list[Any]) -> bool:
        seen = {(e.payload["data"]["id"], e.payload["type"]) for e in events}
        return expected <= seen

    arrived = receiver.wait_for(_all_arrived, timeout_s=60)
    verified, rejected = receiver.events(), receiver.rejected()
    finished = client.get_batch(batch["id"])
    return BatchRun(batch["id"], finished, done, files, specs, arrived, verified, rejected)


def _report(options: DemoOptions, run: RunSummary, batch: BatchRun) -> int:
    """Write the contact sheet, print the table and the totals; 0 when every job and webhook was right."""
    sheet = write_contact_sheet(options.out_dir, run, batch.done, batch.files, batch.specs)
    console.print(summary_table(batch.done, batch.files, batch.specs))
    succeeded = sum(job["status"] == "succeeded" for job in batch.done)
    console.print(
        f"{succeeded}/{len(batch.done)} jobs succeeded; results and contact sheet in {sheet}\n"
        f"webhooks: {len(batch.verified)} verified, {len(batch.rejected)} rejected, "
        f"{'all expected events arrived' if batch.arrived else 'some expected events did not arrive'}"
    )
    return 0 if succeeded == len(batch.done) and batch.arrived and not batch.rejected else 1
