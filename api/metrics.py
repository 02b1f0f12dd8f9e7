"""Prometheus collectors that read the database at scrape time (`ScrapeCollector`), and the latency and
batch-size histograms of recently finished jobs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString
from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from core.schema import jobs

WINDOW = timedelta(hours=1)  # jobs that finished within this window feed the histograms
MAX_ROWS = 20_000  # a scrape reads at most this many recent jobs
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _histogram(values: Iterable[float], bounds: tuple[float, ...]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative Prometheus buckets (with +Inf) and the sum of `values`."""
    data = sorted(values)
    buckets, total, i = [], sum(data), 0
    for bound in bounds:
        while i < len(data) and data[i] <= bound:
            i += 1
        buckets.append((floatToGoString(bound), float(i)))
    buckets.append(("+Inf", float(len(data))))
    return buckets, total


class ScrapeCollector:
    """A collector whose families are made from one read of the database per scrape, so every API process
    reports the same truth. Subclasses give `read` (in one connection) and `families` (from its result);
    when the database does not answer, `unavailable` is yielded instead (nothing by default: the
    database gauge of api.ops reports the outage)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def describe(self) -> list[Metric]:
        return []  # nothing to query at registration time

    def read(self, conn: Connection) -> Any:
        raise NotImplementedError

    def families(self, data: Any) -> Iterable[Metric]:
        raise NotImplementedError

    def unavailable(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        try:
            with self.engine.connect() as conn:
                data = self.read(conn)
        except SQLAlchemyError:
            yield from self.unavailable()
            return
        yield from self.families(data)


class RecentJobsCollector(ScrapeCollector):
    """Wait time, per-stage time and batch size of the jobs that finished in the last hour, per task."""

    def read(self, conn: Connection) -> Any:
        return conn.execute(
            select(
                jobs.c.task,
                func.extract("epoch", jobs.c.started_at - jobs.c.created_at),
                jobs.c.provenance,
            )
            .where(jobs.c.finished_at > func.now() - WINDOW, jobs.c.started_at.is_not(None))
            .order_by(jobs.c.finished_at.desc())
            .limit(MAX_ROWS)
        ).all()

    def families(self, rows: Any) -> Iterable[Metric]:
        waits: dict[str, list[float]] = {}
        stages: dict[tuple[str, str], list[float]] = {}
        sizes: dict[str, list[float]] = {}
        for task, wait, provenance in rows:
            waits.setdefault(task, []).append(float(wait or 0))
            prov = provenance or {}
            if isinstance(prov.get("batch_size"), int):
                sizes.setdefault(task, []).append(float(prov["batch_size"]))
            for name, seconds in (prov.get("timings") or {}).items():
                if name.endswith("_s") and isinstance(seconds, int | float):
                    stages.setdefault((task, name[:-2]), []).append(float(seconds))
        wait = HistogramMetricFamily(
            "nexusgen_job_wait_seconds",
            "Queue wait (created to started) of jobs finished in the last hour.",
            labels=["task"],
        )
        for task, values in sorted(waits.items()):
            wait.add_metric([task], *_histogram(values, SECONDS_BUCKETS))
        stage = HistogramMetricFamily(
            "nexusgen_job_stage_seconds",
            "Seconds per stage of jobs finished in the last hour.",
            labels=["task", "stage"],
        )
        for (task, name), values in sorted(stages.items()):
            stage.add_metric([task, name], *_histogram(values, SECONDS_BUCKETS))
        batch = HistogramMetricFamily(
            "nexusgen_batch_size", "Model-call batch size of jobs finished in the last hour.", labels=["task"]
        )
        for task, values in sorted(sizes.items()):
            batch.add_metric([task], *_histogram(values, BATCH_BUCKETS))
        return (wait, stage, batch)
