"""Progress display of a batch on the terminal (rich): a bar per job, or one for a large batch."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from nexusgen.client import Client

TERMINAL = ("succeeded", "failed", "canceled")
# Wide enough for tables when the output is a file or a pipe (rich assumes 80 columns there).
console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def _steps(job: dict[str, Any]) -> tuple[int, int]:
    """(step, total) of a job's progress; total is 1 for stages without steps."""
    progress = job.get("progress") or {}
    return progress.get("step") or 0, progress.get("total_steps") or 1


PER_JOB_BARS_UP_TO = 32  # larger batches get one bar for the whole batch (from its counts)


def wait_for_batch(
    client: Client, batch_id: str, timeout_s: float, poll_s: float = 0.5
) -> list[dict[str, Any]]:
    """Show progress until every job of the batch ended; return the jobs.

    Small batches get one bar per job (stage and denoising step), large ones a bar for the batch.
    """
    if client.get_batch(batch_id)["total_jobs"] > PER_JOB_BARS_UP_TO:
        _wait_for_counts(client, batch_id, timeout_s, max(poll_s, 2.0))
        return list(client.iter_jobs(batch_id=batch_id))
    deadline = time.monotonic() + timeout_s
    console.print(
        "[dim]one bar per job: its stage and denoising steps; the clock counts from the submission "
        "(time in the queue included)[/dim]"
    )
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stage]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        rows: dict[str, Any] = {}
        while True:
            jobs = list(client.iter_jobs(batch_id=batch_id))
            for job in jobs:
                label = f"{job.get('custom_id') or job['id']:<16} {job['task']:<10}"
                if job["id"] not in rows:
                    rows[job["id"]] = progress.add_task(label, total=1, stage="queued")
                step, total = _steps(job)
                done = total if job["status"] == "succeeded" else min(step, total)
                stage = job["status"] if job["status"] in TERMINAL else job.get("stage") or job["status"]
                if stage == "denoising":
                    stage = f"denoising {step}/{total}"
                progress.update(rows[job["id"]], total=total, completed=done, stage=stage)
            if jobs and all(job["status"] in TERMINAL for job in jobs):
                return jobs
            if time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} did not finish within {timeout_s:.0f} s")
            time.sleep(poll_s)


def _wait_for_counts(client: Client, batch_id: str, timeout_s: float, poll_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("{task.fields[counts]}"), console=console) as progress:
        bar = progress.add_task(f"batch {batch_id}", total=None, counts="")
        while True:
            batch = client.get_batch(batch_id)
            counts = batch["counts"]
            ended = sum(counts.get(status, 0) for status in TERMINAL)
            summary = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
            progress.update(bar, total=batch["total_jobs"], completed=ended, counts=summary)
            if batch["status"] == "completed":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} did not finish within {timeout_s:.0f} s")
            time.sleep(poll_s)
