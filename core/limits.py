"""Per-tenant limits set by an admin (`nexusgen tenant set-limits`); an unset one follows the settings.

Submissions are admitted under the tenant row's lock, in the transaction that creates the jobs, so two
concurrent requests cannot both slip under a limit: `submit_per_minute` is a GCRA rate limiter (a burst
of N, then one every 60/N s; its state is one timestamp on the tenant row) and `max_queued` bounds the
tenant's queued jobs, counting a whole batch at once. `max_running` is applied at claim time
(`running_room`). A refusal raises LimitExceeded: a 429 with Retry-After and the RateLimit fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, func, select, text, update

from core.counts import tenant_queued
from core.schema import jobs, tenants
from core.settings import Settings

# Limit name -> the Settings field holding its default.
DEFAULTS = {
    "max_queued": "tenant_max_queued",
    "submit_per_minute": "tenant_submit_per_minute",
    "max_running": "tenant_max_running",
    "result_ttl_s": "result_ttl_s",
}
LIMIT_NAMES = tuple(DEFAULTS)
WINDOW_S = 60.0  # submit_per_minute's window
QUEUE_FULL_RETRY_S = 30  # a full queue drains at the workers' pace: look again in this long


class TenantGone(LookupError):
    """The tenant was removed while a request of its (cached) API key was on its way."""


class LimitExceeded(Exception):
    """A submission over one of the tenant's limits: nothing was created."""

    def __init__(self, code: str, message: str, details: dict[str, Any], headers: dict[str, str]) -> None:
        super().__init__(message)
        self.code, self.message, self.details, self.headers = code, message, details, headers


@dataclass
class Admission:
    """What the caller tells the client about its limits (the IETF RateLimit-Policy and RateLimit fields)."""

    policies: list[str] = field(default_factory=list)
    remaining: list[str] = field(default_factory=list)

    def headers(self) -> dict[str, str]:
        if not self.policies:
            return {}
        return {"RateLimit-Policy": ", ".join(self.policies), "RateLimit": ", ".join(self.remaining)}


def set_limits(conn: Connection, tenant_id: str, changes: dict[str, int | None]) -> None:
    """Store the tenant's own limits (None: back to the default; 0: no limit)."""
    unknown = sorted(set(changes) - set(LIMIT_NAMES))
    if unknown:
        raise ValueError(f"unknown limits {unknown}; choose from {list(LIMIT_NAMES)}")
    for name, value in changes.items():
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    values: dict[str, Any] = dict(changes)
    if "submit_per_minute" in changes:
        values["submit_tat"] = None  # a new rate starts with a full burst
    if values:
        conn.execute(update(tenants).where(tenants.c.id == tenant_id).values(**values))


def tenant_limits(conn: Connection, tenant_id: str, settings: Settings) -> dict[str, tuple[int, bool]]:
    """{limit: (effective value, whether the tenant has its own)}."""
    row = (
        conn.execute(select(*(tenants.c[n] for n in LIMIT_NAMES)).where(tenants.c.id == tenant_id))
        .mappings()
        .first()
    )
    if row is None:
        raise ValueError(f"no tenant {tenant_id!r}")
    return {n: _effective(row[n], settings, n) for n in LIMIT_NAMES}


def _effective(own: int | None, settings: Settings, name: str) -> tuple[int, bool]:
    return (int(own), True) if own is not None else (int(getattr(settings, DEFAULTS[name])), False)


def admit(conn: Connection, tenant_id: str, new_jobs: int, settings: Settings) -> Admission:
    """Admit a submission of `new_jobs` jobs or raise LimitExceeded; call in the creating transaction.

    The tenant row stays locked until that transaction ends (FOR NO KEY UPDATE: job inserts, which only
    take a key-share lock on it, are not blocked).
    """
    row = (
        conn.execute(
            select(
                tenants.c.max_queued,
                tenants.c.submit_per_minute,
                tenants.c.submit_tat,
                func.now().label("now"),
            )
            .where(tenants.c.id == tenant_id)
            .with_for_update(key_share=True)  # FOR NO KEY UPDATE
        )
        .mappings()
        .first()
    )
    if row is None:
        raise TenantGone(tenant_id)
    per_minute, _ = _effective(row["submit_per_minute"], settings, "submit_per_minute")
    max_queued, _ = _effective(row["max_queued"], settings, "max_queued")
    admission = Admission()
    if per_minute > 0:
        tat = _rate(conn, tenant_id, per_minute, row["submit_tat"], row["now"], admission)
        admission.policies.append(f'"submit";q={per_minute};w={int(WINDOW_S)}')
        admission.remaining.append(tat)
    if max_queued > 0:
        queued = tenant_queued(conn, tenant_id)  # a rollup: a few rows, not the tenant's jobs
        admission.policies.append(f'"queued";q={max_queued}')
        if queued + new_jobs > max_queued:
            admission.remaining.append(f'"queued";r={max(0, max_queued - queued)};t={QUEUE_FULL_RETRY_S}')
            raise LimitExceeded(
                "queue_limit",
                f"{new_jobs} more job(s) would make {queued + new_jobs} queued; this tenant may have at most "
                f"{max_queued} queued; nothing was created",
                {"limit": "max_queued", "max_queued": max_queued, "queued": queued, "submitted": new_jobs},
                {**admission.headers(), "Retry-After": str(QUEUE_FULL_RETRY_S)},
            )
        admission.remaining.append(f'"queued";r={max_queued - queued - new_jobs}')
    return admission


def _rate(
    conn: Connection,
    tenant_id: str,
    per_minute: int,
    tat: datetime | None,
    now: datetime,
    admission: Admission,
) -> str:
    """GCRA: admit if the theoretical arrival time, pushed by one interval, stays within the window."""
    interval = WINDOW_S / per_minute
    start = max(tat or now, now)
    new_tat = start + timedelta(seconds=interval)
    ahead_s = (new_tat - now).total_seconds()
    if ahead_s > WINDOW_S + 1e-9:
        retry = max(1, math.ceil(ahead_s - WINDOW_S))
        reset = max(1, math.ceil((start - now).total_seconds()))
        admission.policies.append(f'"submit";q={per_minute};w={int(WINDOW_S)}')
        admission.remaining.append(f'"submit";r=0;t={retry}')
        raise LimitExceeded(
            "rate_limited",
            f"this tenant may submit {per_minute} times a minute; retry in {retry} s; nothing was created",
            {
                "limit": "submit_per_minute",
                "submit_per_minute": per_minute,
                "retry_after_s": retry,
                "reset_s": reset,
            },
            {**admission.headers(), "Retry-After": str(retry)},
        )
    conn.execute(update(tenants).where(tenants.c.id == tenant_id).values(submit_tat=new_tat))
    remaining = int((WINDOW_S - ahead_s) // interval + 1e-9)
    return f'"submit";r={remaining};t={max(0, math.ceil(ahead_s))}'


def running_room(
    conn: Connection, tenant_ids: set[str], default_max_running: int, *, wait: bool = True
) -> dict[str, int]:
    """For the tenants among `tenant_ids` that have a max_running limit: how many more jobs may start.

    Takes a transaction-scoped advisory lock per limited tenant before counting, so concurrent claims
    of one tenant see each other's committed claims. With `wait=False` a tenant whose lock another claim
    holds gets no room (claims wait for at most one lock: no lock-order cycles).
    """
    if not tenant_ids:
        return {}
    rows = conn.execute(
        select(tenants.c.id, tenants.c.max_running).where(tenants.c.id.in_(sorted(tenant_ids)))
    )
    limits = {t: (own if own is not None else default_max_running) for t, own in rows}
    limited = sorted(t for t, n in limits.items() if n > 0)
    if not limited:
        return {}
    locked = []
    for tenant_id in limited:
        key = {"key": "running:" + tenant_id}
        if wait:
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"), key)
            locked.append(tenant_id)
        elif conn.execute(text("SELECT pg_try_advisory_xact_lock(hashtextextended(:key, 0))"), key).scalar():
            locked.append(tenant_id)
    running: dict[str, int] = (
        dict(
            conn.execute(
                select(jobs.c.tenant_id, func.count())
                .where(jobs.c.status == "running", jobs.c.tenant_id.in_(locked))
                .group_by(jobs.c.tenant_id)
            ).all()
        )
        if locked
        else {}
    )
    return {t: max(0, limits[t] - int(running.get(t, 0))) if t in locked else 0 for t in limited}
