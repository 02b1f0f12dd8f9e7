"""One chaos run: submit batches over HTTP while faults are injected, drain, then check the invariants
from the database, the storage and the receivers' logs, and print one row of the table."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import func, select

from core.auth import create_api_key, create_tenant
from core.db import make_engine
from core.records import TERMINAL_STATUSES
from core.schema import batches, jobs, results, webhook_deliveries, webhook_endpoints, webhook_events
from core.storage import Storage
from nexusgen.receiver import WebhookReceiver
from tests.chaos.receivers import chaos_receiver
from tests.chaos.stack import ChaosStack

# A 503 is expected while a server is down and for this long after it is back (pools reconnect, the
# broker connection is re-established); one outside every such window is a failure.
RECOVERY_S = 10.0

# What each receiver's deliveries must end as once the retry schedule is spent.
EXPECTED_DELIVERY = {
    "ok": {"succeeded"},
    "flaky": {"succeeded"},
    "slow": {"dead"},
    "trickle": {"dead"},
    "redirect": {"dead"},
    "down": {"dead"},
    "gone": {"disabled"},
}


@dataclass
class Scenario:
    name: str
    batches: int
    jobs_per_batch: int
    faults: list[tuple[float, str]]  # (seconds after the first submission, fault)
    receivers: tuple[str, ...] = ("ok", "flaky")
    submit_every_s: float = 2.0
    drain_s: float = 240.0


@dataclass
class Report:
    scenario: str
    faults: list[str] = field(default_factory=list)
    accepted: int = 0
    lost: int = 0
    duplicates: int = 0
    failed: int = 0
    failed_below_poison: int = 0
    server_errors: int = 0  # 5xx other than 503
    unavailable: int = 0  # 503 (with Retry-After) during outages
    unavailable_outside: int = 0  # 503 answered to a request that overlapped no outage (nor its recovery)
    repeated_after_2xx: int = 0
    missing_events: int = 0
    deliveries_unfinished: int = 0
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not (
            self.lost
            or self.duplicates
            or self.failed_below_poison
            or self.server_errors
            or self.unavailable_outside
            or self.repeated_after_2xx
            or self.missing_events
            or self.deliveries_unfinished
        )


HEADER = (
    f"{'scenario':<24} {'faults':>6} {'jobs':>5} {'lost':>4} {'dup':>3} {'failed':>6} {'<poison':>7} "
    f"{'5xx':>3} {'503':>4} {'503 out':>7} {'rep2xx':>6} {'no-evt':>6} {'unfin':>5} {'secs':>5}"
)


def row(r: Report) -> str:
    return (
        f"{r.scenario:<24} {len(r.faults):>6} {r.accepted:>5} {r.lost:>4} {r.duplicates:>3} {r.failed:>6} "
        f"{r.failed_below_poison:>7} {r.server_errors:>3} {r.unavailable:>4} {r.unavailable_outside:>7} "
        f"{r.repeated_after_2xx:>6} "
        f"{r.missing_events:>6} {r.deliveries_unfinished:>5} {r.seconds:>5.0f}"
    )


class Traffic:
    """HTTP clients of the run: batch submissions (retried with their Idempotency-Key) and GET probes."""

    def __init__(self, api_url: str) -> None:
        self.api_url = api_url
        self.statuses: Counter[int] = Counter()
        self.unavailable: list[tuple[float, float]] = []  # (sent, answered) of each 503
        self.accepted: dict[str, list[str]] = {}  # batch id -> job ids
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def _call(self, method: str, path: str, key: str, **kwargs: Any) -> httpx.Response | None:
        sent = time.monotonic()
        try:
            r = httpx.request(method, self.api_url + path, headers={"Authorization": f"Bearer {key}",
                              **kwargs.pop("headers", {})}, timeout=30, **kwargs)  # fmt: skip
        except httpx.HTTPError:
            return None  # the API is restarting; a client retries
        with self.lock:
            self.statuses[r.status_code] += 1
            if r.status_code == 503:
                self.unavailable.append((sent, time.monotonic()))
        return r

    def submit(self, key: str, idempotency_key: str, body: dict[str, Any], give_up_s: float = 120) -> None:
        deadline = time.monotonic() + give_up_s
        while time.monotonic() < deadline:
            r = self._call(
                "POST", "/v1/batches", key, json=body, headers={"Idempotency-Key": idempotency_key}
            )
            if r is not None and r.status_code == 201:
                batch_id = r.json()["id"]
                ids = self._job_ids(key, batch_id)
                with self.lock:
                    self.accepted[batch_id] = ids
                return
            if r is not None and r.status_code < 500:
                raise AssertionError(f"submission refused: {r.status_code} {r.text[:300]}")
            time.sleep(1.0)
        raise AssertionError(f"submission {idempotency_key} not accepted within {give_up_s} s")

    def _job_ids(self, key: str, batch_id: str) -> list[str]:
        ids: list[str] = []
        cursor = None
        while True:
            params = {"batch_id": batch_id, "limit": 200, **({"cursor": cursor} if cursor else {})}
            r = self._call("GET", "/v1/jobs", key, params=params)
            if r is None or r.status_code != 200:
                time.sleep(1.0)
                continue
            page = r.json()
            ids += [j["id"] for j in page["data"]]
            if not page["has_more"]:
                return ids
            cursor = page["next_cursor"]

    def probe(self, keys: dict[str, str]) -> None:
        """GET a random accepted job, and its batch, about five times a second until stopped."""
        rng = random.Random(7)
        while not self.stop.wait(0.2):
            with self.lock:
                batch_ids = list(self.accepted)
            if not batch_ids:
                continue
            batch_id = rng.choice(batch_ids)
            for key in keys.values():
                r = self._call("GET", f"/v1/batches/{batch_id}", key)
                if r is not None and r.status_code == 200:
                    job_id = rng.choice(self.accepted[batch_id])
                    self._call("GET", f"/v1/jobs/{job_id}", key)
                    break


def run_scenario(stack: ChaosStack, scenario: Scenario, print_row: Callable[[str], None] = print) -> Report:
    """Submit, inject, drain and check; return the report (its row is printed)."""
    engine = make_engine(stack.settings)
    receivers = {mode: chaos_receiver(mode) for mode in scenario.receivers}
    keys: dict[str, str] = {}
    with engine.begin() as conn:
        for mode in receivers:
            name = f"{scenario.name}-{mode}"
            create_tenant(conn, name)
            keys[mode] = create_api_key(conn, name)
    traffic = Traffic(stack.api_url)
    prober = threading.Thread(target=traffic.probe, args=(keys,), daemon=True)
    prober.start()
    faults_done = threading.Event()
    started = time.monotonic()
    first_fault = len(stack.faults)

    def inject() -> None:
        try:
            for at, fault in scenario.faults:
                time.sleep(max(0.0, started + at - time.monotonic()))
                apply_fault(stack, fault)
        finally:
            faults_done.set()

    injector = threading.Thread(target=inject, daemon=True)
    injector.start()
    modes = list(receivers)
    for i in range(scenario.batches):
        mode = modes[i % len(modes)]
        body = {
            "jobs": [
                {
                    "custom_id": f"{i}-{n}",
                    "task": "generate",
                    "prompt": f"chaos {i} {n}",
                    "params": {"width": 256, "height": 256, "steps": 1, "seed": n},
                }
                for n in range(scenario.jobs_per_batch)
            ],
            "webhook": {"url": receivers[mode].url},
        }
        traffic.submit(keys[mode], f"{scenario.name}-{i}", body)
        time.sleep(scenario.submit_every_s)
    faults_done.wait()
    report = Report(scenario.name, faults=[what for _, what in stack.faults[first_fault:]])
    drain(engine, traffic, scenario.drain_s)
    traffic.stop.set()
    prober.join(timeout=5)
    check(report, engine, Storage.from_settings(stack.settings), traffic, receivers, stack)
    report.seconds = time.monotonic() - started
    for receiver in receivers.values():
        receiver.close()
    engine.dispose()
    print_row(row(report))
    return report


def apply_fault(stack: ChaosStack, fault: str) -> None:
    """One named fault; `a+b` runs two at once."""
    if "+" in fault:
        threads = [threading.Thread(target=apply_fault, args=(stack, f)) for f in fault.split("+")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return
    if fault == "kill_worker_main":
        stack.kill_worker_main()
    elif fault == "kill_worker_child":
        stack.kill_worker_child()
    elif fault in ("redis", "postgres", "s3"):
        stack.outage(fault, 6.0)
    elif fault.endswith("_stop"):
        stack.outage(fault.removesuffix("_stop"), 6.0, kill=False)
    else:
        raise ValueError(f"unknown fault {fault!r}")


def drain(engine: Any, traffic: Traffic, timeout_s: float, stall_s: float = 120.0) -> None:
    """Wait until every accepted job is terminal and no delivery is pending.

    On a loaded machine the model worker is slow, not stuck: waiting goes on past `timeout_s` while jobs
    keep ending, and stops once nothing ended for `stall_s` (what is left then counts as lost).
    """
    deadline = time.monotonic() + timeout_s
    last_progress, last_done = time.monotonic(), -1
    while True:
        ids = [i for batch in traffic.accepted.values() for i in batch]
        try:
            with engine.connect() as conn:
                done = conn.execute(
                    select(func.count()).where(jobs.c.id.in_(ids), jobs.c.status.in_(TERMINAL_STATUSES))
                ).scalar_one()
                pending = conn.execute(
                    select(func.count()).where(webhook_deliveries.c.status == "pending")
                ).scalar_one()
        except Exception:  # noqa: BLE001 - the database may be in its outage; look again
            done, pending = last_done, 1
        if done == len(ids) and pending == 0:
            return
        now = time.monotonic()
        if done > last_done:
            last_progress, last_done = now, done
        if now > deadline and now - last_progress > stall_s:
            return
        time.sleep(1.0)


def outside_outages(calls: list[tuple[float, float]], outages: list[tuple[float, float]]) -> int:
    """How many (sent, answered) calls overlapped no outage (down, up), each widened by RECOVERY_S."""
    windows = [(down, up + RECOVERY_S) for down, up in outages]
    return sum(
        1 for sent, answered in calls if not any(sent <= end and answered >= start for start, end in windows)
    )


def check(
    report: Report,
    engine: Any,
    storage: Storage,
    traffic: Traffic,
    receivers: dict[str, WebhookReceiver],
    stack: ChaosStack,
) -> None:
    """Fill the report's invariant figures from the database, the storage and the receivers' logs."""
    accepted = {i: b for b, ids in traffic.accepted.items() for i in ids}
    report.accepted = len(accepted)
    max_attempts = stack.settings.max_attempts
    with engine.connect() as conn:
        rows = {
            r["id"]: r
            for r in conn.execute(select(jobs).where(jobs.c.id.in_(list(accepted)))).mappings().all()
        }
        result_counts = Counter(
            conn.execute(select(results.c.job_id).where(results.c.job_id.in_(list(accepted)))).scalars()
        )
        events = Counter(
            (e.job_id, e.type)
            for e in conn.execute(
                select(webhook_events.c.job_id, webhook_events.c.type).where(
                    webhook_events.c.job_id.in_(list(accepted))
                )
            )
        )
        batch_events = Counter(
            conn.execute(
                select(webhook_events.c.batch_id).where(
                    webhook_events.c.type == "batch.completed",
                    webhook_events.c.batch_id.in_(list(traffic.accepted)),
                )
            ).scalars()
        )
        completed = set(
            conn.execute(
                select(batches.c.id).where(
                    batches.c.id.in_(list(traffic.accepted)), batches.c.completed_at.is_not(None)
                )
            ).scalars()
        )
        deliveries = conn.execute(
            select(webhook_deliveries.c.status, webhook_deliveries.c.endpoint_id, webhook_events.c.payload)
            .join(webhook_events, webhook_events.c.id == webhook_deliveries.c.event_id)
            .where(webhook_deliveries.c.tenant_id.in_(select(batches.c.tenant_id).distinct()))
        ).all()
    report.lost = sum(1 for i in accepted if i not in rows or rows[i]["status"] not in TERMINAL_STATUSES)
    for job_id, row_ in rows.items():
        status = row_["status"]
        if status == "succeeded":
            objects = storage.list_keys(f"tenants/{row_['tenant_id']}/jobs/{job_id}/")
            report.duplicates += int(result_counts[job_id] != 1) + int(len(objects) != 1)
        elif result_counts[job_id]:
            report.duplicates += 1
        if status == "failed":
            report.failed += 1
            if row_["worker_losses"] < max_attempts:
                report.failed_below_poison += 1
        if status in TERMINAL_STATUSES:
            report.missing_events += abs(events[(job_id, f"job.{status}")] - 1)
    report.missing_events += sum(abs(batch_events[b] - 1) for b in completed)
    report.missing_events += len(set(traffic.accepted) - completed)
    by_url = {r.url: mode for mode, r in receivers.items()}
    with engine.connect() as conn:
        urls = dict(conn.execute(select(webhook_endpoints.c.id, webhook_endpoints.c.url)).all())
    for status, endpoint_id, _payload in deliveries:
        mode = by_url.get(urls.get(endpoint_id, ""))
        if mode is not None and status not in EXPECTED_DELIVERY[mode]:
            report.deliveries_unfinished += 1
    report.server_errors = sum(n for code, n in traffic.statuses.items() if code >= 500 and code != 503)
    report.unavailable = traffic.statuses.get(503, 0)
    report.unavailable_outside = outside_outages(traffic.unavailable, stack.outages)
    report.repeated_after_2xx = sum(r.repeated_after_2xx() for r in receivers.values())
