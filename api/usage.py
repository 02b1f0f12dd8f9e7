"""GET /v1/usage: the caller's tenant's consumption by day or by task; per-tenant counters for /metrics."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, time, timedelta
from typing import Any

from apiflask import APIBlueprint
from flask import Response, jsonify
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from sqlalchemy import Connection

from api.auth import auth, current_principal
from api.context import services
from api.errors import fail
from api.metrics import ScrapeCollector
from api.schemas import UsageOut, UsageQuery
from core.usage import COUNTERS, summarize, totals_by_tenant

bp = APIBlueprint("usage", __name__, tag="Usage")

DEFAULT_SPAN = timedelta(days=30)


def parse_time(value: str, name: str) -> datetime:
    """An ISO 8601 date (midnight UTC) or date-time (UTC when no offset is given)."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        fail(400, "invalid_time", f"{name} must be an ISO 8601 date or date-time, got {value[:60]!r}")
    if len(value) <= 10:  # a plain date
        parsed = datetime.combine(parsed.date(), time(), UTC)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


@bp.get("/v1/usage")
@bp.auth_required(auth, roles=["read"])
@bp.input(UsageQuery, location="query", arg_name="query")
@bp.output(UsageOut)
@bp.doc(responses=[400])
def get_usage(query: dict[str, Any]) -> Response:
    """What the tenant's finished jobs consumed in [from, to) (default: the last 30 days), by day (UTC) or
    task: jobs, model seconds (each job's share of its model call), images, steps, pixels, tokens."""
    principal = current_principal()
    end = parse_time(query["to"], "to") if query.get("to") else datetime.now(UTC)
    start = parse_time(query["from_"], "from") if query.get("from_") else end - DEFAULT_SPAN
    if start > end:
        fail(400, "invalid_time", "from must not be after to")
    with services().engine.connect() as conn:
        rows = summarize(conn, principal.tenant_id, start, end, query["group_by"])
    total: dict[str, Any] = {"jobs": sum(r["jobs"] for r in rows)}
    for name in COUNTERS:
        total[name] = sum(r[name] for r in rows)
    total["model_seconds"] = round(total["model_seconds"], 6)
    return jsonify(
        {
            "object": "usage",
            "from": start.isoformat(),
            "to": end.isoformat(),
            "group_by": query["group_by"],
            "data": rows,
            "total": total,
        }
    )


class UsageCollector(ScrapeCollector):
    """Per-tenant usage counters at scrape time, from the running totals (a row per tenant and task)."""

    def read(self, conn: Connection) -> Any:
        return totals_by_tenant(conn)

    def families(self, rows: Any) -> Iterable[Metric]:
        families = {
            "jobs": CounterMetricFamily(
                "nexusgen_tenant_jobs",
                "Jobs finished by a worker, per tenant and task.",
                labels=["tenant", "task"],
            ),
            **{
                name: CounterMetricFamily(
                    f"nexusgen_tenant_{name}",
                    f"Usage of finished jobs per tenant and task: {name.replace('_', ' ')}.",
                    labels=["tenant", "task"],
                )
                for name in COUNTERS
            },
        }
        for row in rows:
            for name, family in families.items():
                family.add_metric([row["tenant"], row["task"]], float(row[name]))
        return families.values()
