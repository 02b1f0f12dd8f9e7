"""Usage: what each job finished by a worker consumed, recorded in the transaction that ends it.

Model seconds are the job's share of its model call: each stage's time divided by the call's batch size
(the jobs of one call share one bucket, so equal shares are fair), summed over the stages. A per-job
record is written once, and per-(tenant, task) running totals with it, so the /metrics counters cost
one small read and always equal the sums of the records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, RowMapping, cast, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.types import Date

from core.records import Job
from core.schema import tenants, usage_records, usage_totals

COUNTERS = ("model_seconds", "images", "steps", "pixels", "input_tokens", "output_tokens")
GROUPS = ("day", "task")


@dataclass(frozen=True)
class Usage:
    """One job's consumption."""

    model_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    images: int = 0
    steps: int = 0
    pixels: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    @classmethod
    def from_provenance(cls, provenance: dict[str, Any] | None, image_size: tuple[int, int] | None) -> Usage:
        """The usage of a job from the model's provenance of its call (`timings` per stage of the whole
        call, `batch_size`, token counts) and its output image size (None: no image)."""
        prov = provenance or {}
        size = max(1, int(prov.get("batch_size") or 1))
        model_timings = prov.get("timings") or {}
        stages = {
            name.removesuffix("_s"): round(float(seconds) / size, 6)
            for name, seconds in model_timings.items()
            if isinstance(seconds, int | float)
        }
        steps = int((prov.get("params") or {}).get("steps") or 0) if image_size else 0
        return cls(
            model_seconds=round(sum(stages.values()), 6),
            stage_seconds=stages,
            images=1 if image_size else 0,
            steps=steps,
            pixels=image_size[0] * image_size[1] if image_size else 0,
            input_tokens=int(prov.get("input_tokens") or 0),
            output_tokens=int(prov.get("output_tokens") or 0),
        )


def record_usage(conn: Connection, job: Job, usage: Usage) -> None:
    """Write the job's record and add it to its tenant's totals (call in the job's ending transaction)."""
    values = asdict(usage)
    conn.execute(
        usage_records.insert().values(
            job_id=job.id,
            tenant_id=job.tenant_id,
            batch_id=job.batch_id,
            task=job.task,
            status=job.status,
            **values,
        )
    )
    counters = {name: values[name] for name in COUNTERS}
    stmt = insert(usage_totals).values(tenant_id=job.tenant_id, task=job.task, jobs=1, **counters)
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[usage_totals.c.tenant_id, usage_totals.c.task],
            set_={
                "jobs": usage_totals.c.jobs + 1,
                **{name: usage_totals.c[name] + stmt.excluded[name] for name in COUNTERS},
            },
        )
    )


def summarize(
    conn: Connection, tenant_id: str, start: datetime, end: datetime, group_by: str
) -> list[dict[str, Any]]:
    """The tenant's usage in [start, end), one row per day (UTC) or per task."""
    if group_by not in GROUPS:
        raise ValueError(f"group_by must be one of {GROUPS}")
    c = usage_records.c
    key = cast(func.timezone("UTC", c.finished_at), Date) if group_by == "day" else c.task
    rows = conn.execute(
        select(
            key.label("key"),
            func.count().label("jobs"),
            *(func.sum(c[name]).label(name) for name in COUNTERS),
        )
        .where(c.tenant_id == tenant_id, c.finished_at >= start, c.finished_at < end)
        .group_by(key)
        .order_by(key)
    ).mappings()
    return [
        {
            group_by: row["key"].isoformat() if group_by == "day" else row["key"],
            "jobs": int(row["jobs"]),
            "model_seconds": round(float(row["model_seconds"]), 6),
            **{name: int(row[name]) for name in COUNTERS if name != "model_seconds"},
        }
        for row in rows
    ]


def totals_by_tenant(conn: Connection) -> list[RowMapping]:
    """Running totals per (tenant name, task), for the /metrics counters."""
    return list(
        conn.execute(
            select(tenants.c.name.label("tenant"), usage_totals)
            .join(tenants, tenants.c.id == usage_totals.c.tenant_id)
            .order_by(tenants.c.name, usage_totals.c.task)
        ).mappings()
    )
