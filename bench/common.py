"""Shared bench plumbing: thread and device setup, wall-clock timing, the tiny checkpoint, result files."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def base_parser(description: str) -> argparse.ArgumentParser:
    """Arguments every bench takes: device, threads, number of timed runs."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--runs", type=int, default=None, help="timed runs per configuration (median reported)"
    )
    return parser


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """Fix threads and seed; bf16 on GPU, fp32 on CPU (the stack's defaults)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds over all threads, result) of one call, GPU synchronised.

    On a shared CPU machine the wall time swings with other processes' load; the CPU time measures the
    work itself and stays comparable between configurations.
    """
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu, out


def median(values: list[float]) -> float:
    return float(statistics.median(values))


KEYS = ("wall_median_s", "wall_min_s", "cpu_median_s")


def summarize(times: list[tuple[float, float]]) -> dict[str, Any]:
    """Median and min wall seconds, median CPU seconds, and the raw (wall, cpu) pairs of timed runs."""
    return {
        "wall_median_s": median([t[0] for t in times]),
        "wall_min_s": min(t[0] for t in times),
        "cpu_median_s": median([t[1] for t in times]),
        "times_wall_cpu_s": times,
    }


def tiny_components(device: torch.device, dtype: torch.dtype) -> Any:
    """The tiny checkpoint's components (tokenizer, VAE, text encoders...), written to a temporary dir."""
    from model.checkpoint import load_components
    from model.tiny import write_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="nexusgen-bench-") as tmp:
        return load_components(write_tiny_checkpoint(tmp, seed=0), device, dtype)


def environment(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_end": os.getloadavg()[0],  # other processes share the machine
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write bench/results/NAME.json and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain aligned text table."""
    cells = [header] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plans_table(results: list[dict[str, Any]], column: str) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) figures of each result's `plans`, one column per result's `column` value."""
    cells = [
        [name, *(f"{r['plans'][name]['server_ms']} ms, {r['plans'][name]['pages']} pages" for r in results)]
        for name in results[0]["plans"]
    ]
    return table(cells, ["EXPLAIN (ANALYZE, BUFFERS)", *(str(r[column]) for r in results)])


def inline_sql(statement: Any) -> str:
    """A SQLAlchemy statement as PostgreSQL text with its parameters written in (for EXPLAIN)."""
    from sqlalchemy.dialects import postgresql

    return str(statement.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))


def explain(conn: Any, sql: str, params: dict[str, Any]) -> dict[str, float]:
    """EXPLAIN (ANALYZE, BUFFERS) of `sql` (plain text, run for real): server ms and pages touched, which do
    not move with the machine's load as wall times do. The caller rolls back what it changed."""
    from sqlalchemy import text

    plan = conn.execute(text(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}"), params).scalar_one()[0]
    top = plan["Plan"]
    return {
        "server_ms": round(plan["Execution Time"], 3),
        "pages": top.get("Shared Hit Blocks", 0) + top.get("Shared Read Blocks", 0),
    }
