"""Operations: liveness, readiness (database, broker, storage) and Prometheus metrics from the database."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from apiflask import APIBlueprint
from flask import Response, current_app, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from sqlalchemy import Connection, Engine, text

from api.context import services
from api.metrics import RecentJobsCollector, ScrapeCollector
from api.usage import UsageCollector
from core.counts import deliveries_by_status, tally
from core.device_memory import FIELDS as DEVICE_MEMORY_FIELDS
from core.device_memory import read_device_memory
from core.records import TASKS, DeliveryStatus, JobStatus
from core.settings import Settings

bp = APIBlueprint("ops", __name__, tag="Operations")


# The longest wait of a task's queued jobs: the first entry of ix_jobs_queued_since.
_OLDEST = text(
    "SELECT extract(epoch FROM now() - min(enqueued_at)) FROM jobs WHERE status = 'queued' AND task = :task"
)


class DatabaseCollector(ScrapeCollector):
    """Gauges of jobs, the queue and webhook deliveries.

    Counts come from the counters (core.counts), never from a count over job or delivery rows, so a
    scrape costs the same at any depth.
    """

    def read(self, conn: Connection) -> Any:
        counts, queued = tally(conn)
        ages = [
            (task, conn.execute(_OLDEST, {"task": task}).scalar())
            for task in sorted({t for t, _, _ in queued})
        ]
        return counts, queued, ages, deliveries_by_status(conn)

    def unavailable(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("nexusgen_metrics_database_up", "1 if the database answered this scrape.")
        up.add_metric([], 0)
        return (up,)

    def families(self, data: Any) -> Iterable[Metric]:
        counts, queued, ages, delivered = data
        by_status = GaugeMetricFamily("nexusgen_jobs", "Jobs by task and status.", labels=["task", "status"])
        depth = GaugeMetricFamily(
            "nexusgen_queue_depth",
            "Queued jobs by task, bucket and priority.",
            labels=["task", "bucket", "priority"],
        )
        oldest = GaugeMetricFamily(
            "nexusgen_queue_oldest_age_seconds", "Age of the oldest queued job by task.", labels=["task"]
        )
        deliveries = GaugeMetricFamily(
            "nexusgen_webhook_deliveries", "Webhook deliveries by status.", labels=["status"]
        )
        up = GaugeMetricFamily("nexusgen_metrics_database_up", "1 if the database answered this scrape.")
        up.add_metric([], 1)
        tasks = sorted({t for t, _ in counts} | set(TASKS))
        for task in tasks:
            for status in JobStatus:
                by_status.add_metric([task, status.value], counts.get((task, status), 0))
        for (task, bucket, priority), n in sorted(queued.items()):
            depth.add_metric([task, bucket, str(priority)], n)
        for task, age in ages:
            oldest.add_metric([task], float(age or 0))
        for delivery_status in sorted({s.value for s in DeliveryStatus} | set(delivered)):
            deliveries.add_metric([delivery_status], delivered.get(delivery_status, 0))
        return (up, by_status, depth, oldest, deliveries)


class DeviceMemoryCollector:
    """Allocated, peak and total accelerator memory per worker device, as the workers last published it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        families = {
            name: GaugeMetricFamily(
                f"nexusgen_worker_device_memory_{name}",
                f"Accelerator memory {name.replace('_', ' ')} per worker device.",
                labels=["worker", "device", "rank"],
            )
            for name in DEVICE_MEMORY_FIELDS
        }
        for worker, devices in read_device_memory(self.settings).items():
            for dev in devices:
                for name, family in families.items():
                    family.add_metric([worker, str(dev["device"]), str(dev.get("rank", 0))], float(dev[name]))
        yield from families.values()


def make_registry(engine: Engine, settings: Settings | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(engine))  # type: ignore[arg-type]
    registry.register(RecentJobsCollector(engine))  # type: ignore[arg-type]
    registry.register(UsageCollector(engine))  # type: ignore[arg-type]
    if settings is not None:
        registry.register(DeviceMemoryCollector(settings))  # type: ignore[arg-type]
    return registry


@bp.get("/healthz")
@bp.doc(responses={200: "The process is up."})
def healthz() -> Response:
    """Liveness: answers without touching any dependency."""
    return jsonify({"status": "ok"})


def _check(probe: Any) -> dict[str, Any]:
    started = time.monotonic()
    try:
        ok = bool(probe())
        error = None if ok else "not ready"
    except Exception as exc:  # noqa: BLE001 - any failure of a dependency means "not ready"; reported
        ok, error = False, f"{type(exc).__name__}: {exc}"
    return {"ok": ok, "error": error, "latency_ms": round((time.monotonic() - started) * 1000, 1)}


def _database_ready() -> bool:
    with services().engine.connect() as conn:
        return conn.execute(text("SELECT 1")).scalar() == 1


def _broker_ready() -> bool:
    with services().publisher().connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=2)
    return True


@bp.get("/readyz")
@bp.doc(responses={200: "Database, broker and storage answer.", 503: "A dependency does not answer."})
def readyz() -> Response:
    """Readiness: the database, the broker and object storage are reachable."""
    checks = {
        "database": _check(_database_ready),
        "broker": _check(_broker_ready),
        "storage": _check(services().storage.ping),
    }
    ready = all(c["ok"] for c in checks.values())
    response = jsonify({"status": "ready" if ready else "unavailable", "checks": checks})
    response.status_code = 200 if ready else 503
    return response


@bp.get("/metrics")
@bp.doc(responses={200: "Prometheus text format."})
def metrics() -> Response:
    """Prometheus metrics: jobs by status, queue depth per bucket and priority, webhook deliveries."""
    registry: CollectorRegistry = current_app.extensions["nexusgen_metrics"]
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
