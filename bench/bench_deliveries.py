"""Webhook delivery claims at depth: claim_due beside the claim of before 0010, at 1k/10k/100k due.

Starts an embedded PostgreSQL migrated to head, makes 50 tenants with 4 endpoints each and fills due
deliveries (spread unevenly between tenants, as backlogs are: tenant k gets about (k+1)^-1 of them
relative to tenant 0), plus retries not yet due (a tenth of the due count) and finished deliveries (as
many as due), through INSERT ... SELECT. Before timing: 64 attempts in flight (live leases, two for each
of 32 tenants), 16 leases that ran out, ANALYZE. At each depth it times claims of 8 (`limit=8`, as a
webhook worker's free slots), each in its own committed transaction, taking turns: the claim of before
(its text is kept below, `claim_before`, and the index it read, ix_webhook_deliveries_due, is made again
for it) and today's claim_due; after each, the claimed leases are cleared (untimed), so every claim sees
the same depth. `exclude` holds 100 delivered ids, as a worker's `tried` set does. It also checks both
claims choose the same deliveries, and reports EXPLAIN (ANALYZE, BUFFERS) server time and pages of the
statements behind each claim (figures that do not move with the machine's load as wall times do).
Run: `python -m bench.bench_deliveries [--depths 1000,10000,100000] [--samples 100]`;
writes bench/results/deliveries.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Collection
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, RowMapping, func, or_, select, text, update

from bench.bench_get import percentile
from bench.common import explain, inline_sql, plans_table, table, write_result
from core import deliveries
from core.records import DeliveryStatus
from core.schema import webhook_deliveries

TENANTS = 50
ENDPOINTS_PER_TENANT = 4
LIMIT = 8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="1000,10000,100000", help="due deliveries at each measurement")
    parser.add_argument("--samples", type=int, default=100, help="timed claims of each kind per depth")
    return parser.parse_args()


# The claim of before 0010, as it was (core/deliveries.py at d6d39e3): a window ranking every due row.
def _in_flight_before(conn: Connection) -> tuple[Counter[str], Counter[str]]:
    rows = conn.execute(_in_flight_before_query()).all()
    per_endpoint: Counter[str] = Counter()
    per_tenant: Counter[str] = Counter()
    for endpoint_id, tenant_id, n in rows:
        per_endpoint[endpoint_id] += n
        per_tenant[tenant_id] += n
    return per_endpoint, per_tenant


def _in_flight_before_query() -> Any:
    return (
        select(webhook_deliveries.c.endpoint_id, webhook_deliveries.c.tenant_id, func.count())
        .where(
            webhook_deliveries.c.status == DeliveryStatus.PENDING,
            webhook_deliveries.c.next_attempt_at <= func.now(),
            webhook_deliveries.c.locked_until > func.now(),
        )
        .group_by(webhook_deliveries.c.endpoint_id, webhook_deliveries.c.tenant_id)
    )


def _ranked_before_query(limit: int, exclude: Collection[str]) -> Any:
    due = [
        webhook_deliveries.c.status == DeliveryStatus.PENDING,
        webhook_deliveries.c.next_attempt_at <= func.now(),
        or_(webhook_deliveries.c.locked_until.is_(None), webhook_deliveries.c.locked_until < func.now()),
    ]
    if exclude:
        due.append(webhook_deliveries.c.id.not_in(list(exclude)))
    turn = (
        func.row_number()
        .over(partition_by=webhook_deliveries.c.tenant_id, order_by=webhook_deliveries.c.next_attempt_at)
        .label("turn")
    )
    ranked = select(webhook_deliveries.c.id, turn).where(*due).subquery()
    return (
        select(webhook_deliveries.c.id, webhook_deliveries.c.endpoint_id, webhook_deliveries.c.tenant_id)
        .join(ranked, ranked.c.id == webhook_deliveries.c.id)
        .where(*due[:3])
        .order_by(ranked.c.turn, webhook_deliveries.c.next_attempt_at)
        .limit(limit * 4)
        .with_for_update(of=webhook_deliveries, skip_locked=True)
    )


def claim_before(conn: Connection, limit: int, lock_s: float, exclude: Collection[str]) -> list[RowMapping]:
    conn.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(deliveries._CLAIM_LOCK, 0))))
    per_endpoint, per_tenant = _in_flight_before(conn)
    candidates = conn.execute(_ranked_before_query(limit, exclude)).all()
    return deliveries.lease(conn, deliveries.within_caps(candidates, per_endpoint, per_tenant, limit), lock_s)


def setup_tenants(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO tenants (id, name, webhook_secret)"
                " SELECT 'ten_' || t, 'bench-' || t, 'whsec_bench' FROM generate_series(0, :n - 1) AS t"
            ),
            {"n": TENANTS},
        )
        conn.execute(
            text(
                "INSERT INTO webhook_endpoints (id, tenant_id, url)"
                " SELECT 'whe_' || t || '_' || e, 'ten_' || t, 'https://hooks.example/' || t || '/' || e"
                " FROM generate_series(0, :n - 1) AS t, generate_series(0, :e - 1) AS e"
            ),
            {"n": TENANTS, "e": ENDPOINTS_PER_TENANT},
        )
        # The index the claim of before read (0010 dropped it), so that it runs as it did.
        conn.execute(
            text(
                "CREATE INDEX IF NOT EXISTS ix_webhook_deliveries_due"
                " ON webhook_deliveries (status, next_attempt_at)"
            )
        )


def fill(engine: Engine, first: int, due: int) -> None:
    """`due` due deliveries numbered from `first`, a tenth as many retries not yet due, as many finished."""
    later = max(1, due // 10)
    with engine.begin() as conn:
        conn.execute(
            text(
                # Tenant by a Zipf-like draw: tenant k about 1/(k+1) as many as tenant 0.
                "CREATE TEMP TABLE src ON COMMIT DROP AS"
                " SELECT g, least(:n - 1, floor(exp(random() * ln(:n + 1)) - 1))::int AS t,"
                " floor(random() * :e)::int AS e,"
                " CASE WHEN g < :first + :due THEN 'due' WHEN g < :first + :due + :later THEN 'later'"
                " ELSE 'done' END AS kind"
                " FROM generate_series(:first, :first + 2 * :due + :later - 1) AS g"
            ),
            {"n": TENANTS, "e": ENDPOINTS_PER_TENANT, "first": first, "due": due, "later": later},
        )
        conn.execute(
            text(
                "INSERT INTO webhook_events (id, tenant_id, type, payload)"
                " SELECT 'msg_' || g, 'ten_' || t, 'batch.completed',"
                " jsonb_build_object('type', 'batch.completed',"
                " 'data', jsonb_build_object('id', 'bat_' || g))"
                " FROM src"
            )
        )
        conn.execute(
            text(
                "INSERT INTO webhook_deliveries"
                " (id, event_id, endpoint_id, tenant_id, status, attempts, next_attempt_at, delivered_at)"
                " SELECT 'whd_' || g, 'msg_' || g, 'whe_' || t || '_' || e, 'ten_' || t,"
                " CASE WHEN kind = 'done' THEN 'succeeded' ELSE 'pending' END,"
                " CASE WHEN kind = 'due' THEN 0 ELSE 1 END,"
                " CASE WHEN kind = 'later' THEN now() + random() * interval '1 hour'"
                " ELSE now() - random() * interval '1 hour' END,"
                " CASE WHEN kind = 'done' THEN now() END"
                " FROM src"
            )
        )


def set_leases(engine: Engine) -> None:
    """64 attempts in flight (two for each of 32 tenants) and 16 leases that ran out."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE webhook_deliveries SET locked_until = NULL WHERE locked_until IS NOT NULL"))
        conn.execute(
            text(
                "WITH r AS (SELECT id, tenant_id, row_number() OVER (PARTITION BY tenant_id ORDER BY id) AS k"
                " FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= now()),"
                " live AS (SELECT id FROM r WHERE k <= 2 AND tenant_id IN (SELECT DISTINCT tenant_id FROM r"
                " ORDER BY tenant_id LIMIT 32)),"
                " stale AS (SELECT id FROM r WHERE k = 3 LIMIT 16)"
                " UPDATE webhook_deliveries AS d SET locked_until = CASE WHEN d.id IN (SELECT id FROM live)"
                " THEN now() + interval '1 hour' ELSE now() - interval '1 minute' END"
                " WHERE d.id IN (SELECT id FROM live UNION ALL SELECT id FROM stale)"
            )
        )
        conn.execute(text("ANALYZE webhook_deliveries"))
        conn.execute(text("ANALYZE webhook_events"))


def plans(engine: Engine, exclude: list[str]) -> dict[str, dict[str, float]]:
    """EXPLAIN (ANALYZE, BUFFERS) of each claim's reads, before and now: server ms and pages touched."""

    params = {
        "exclude": exclude,
        "full_tenants": [],
        "full_endpoints": [],
        "per_tenant": deliveries.PER_TENANT_LIMIT,
        "limit": LIMIT * 4,
    }
    queries: dict[str, tuple[str, dict[str, Any]]] = {
        "in flight before": (inline_sql(_in_flight_before_query()), {}),
        "in flight now": (deliveries._IN_FLIGHT.text, {}),
        "candidates before (ranking)": (inline_sql(_ranked_before_query(LIMIT, exclude)), {}),
        "candidates now (heads)": (deliveries._CANDIDATES.text, params),
    }
    with engine.begin() as conn:
        out = {name: explain(conn, sql, bind) for name, (sql, bind) in queries.items()}
        conn.rollback()
    return out


def claim_now(conn: Connection, limit: int, lock_s: float, exclude: Collection[str]) -> list[RowMapping]:
    return deliveries.claim_due(conn, limit=limit, lock_s=lock_s, exclude=exclude)


def measure(engine: Engine, samples: int) -> dict[str, Any]:
    """Both claims' choice (the same?), their plans, and `samples` timed claims of each, taking turns."""
    with engine.connect() as conn:
        exclude = list(
            conn.execute(
                text("SELECT id FROM webhook_deliveries WHERE status = 'succeeded' LIMIT 100")
            ).scalars()
        )
    picks = []
    for claim in (claim_before, claim_now):  # each in a transaction rolled back
        with engine.connect() as conn, conn.begin():
            picks.append(sorted(d["id"] for d in claim(conn, LIMIT, 60, exclude)))
            conn.rollback()
    ms: dict[str, list[float]] = {"claim_before": [], "claim_now": []}
    for _ in range(samples):
        for name, claim in (("claim_before", claim_before), ("claim_now", claim_now)):
            started = time.perf_counter()
            with engine.begin() as conn:
                rows = claim(conn, LIMIT, 60, exclude)
            ms[name].append((time.perf_counter() - started) * 1000)
            assert len(rows) == LIMIT, (name, len(rows))
            with engine.begin() as conn:  # untimed: release the leases, so every claim sees the same depth
                conn.execute(
                    update(webhook_deliveries)
                    .where(webhook_deliveries.c.id.in_([d["id"] for d in rows]))
                    .values(locked_until=None)
                )
    timed = {
        name: {"median_ms": round(statistics.median(v), 2), "p99_ms": round(percentile(v, 0.99), 2)}
        for name, v in ms.items()
    }
    return {"same_choice": picks[0] == picks[1], "plans": plans(engine, exclude), **timed}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main() -> int:
    args = parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    from core.db import make_engine
    from core.migrate import upgrade
    from core.settings import Settings
    from nexusgen import embedded

    root = Path(tempfile.mkdtemp(prefix="nexusgen-bench-deliveries-"))
    os.chmod(root, 0o755)  # the embedded Postgres runs as an unprivileged user
    pg = embedded.start_postgres(root / "pg", embedded.free_port(), root / "pg.log")
    results: list[dict[str, Any]] = []
    try:
        settings = Settings(database_url=pg.url, state_dir=root / "state")
        upgrade(settings)
        engine = make_engine(settings)
        setup_tenants(engine)
        print(f"start: {uptime()}", flush=True)
        filled = 0
        for depth in depths:
            fill(engine, filled * 3, depth - filled)
            filled = depth
            set_leases(engine)
            load_before = os.getloadavg()
            row = measure(engine, args.samples)
            row.update(due=depth, loadavg=[round(x, 2) for x in (*load_before, *os.getloadavg())])
            results.append(row)
            print(json.dumps(row), flush=True)
        print(f"end: {uptime()}")
        columns = ("claim_before", "claim_now")
        rows = [
            [
                r["due"],
                *(f"{r[c]['median_ms']}/{r[c]['p99_ms']}" for c in columns),
                r["same_choice"],
                r["loadavg"][0],
            ]
            for r in results
        ]
        print(table(rows, ["due", "before med/p99 ms", "now med/p99 ms", "same choice", "load 1m"]))
        print(plans_table(results, "due"))
        write_result(
            "deliveries",
            {"bench": "deliveries", "tenants": TENANTS, "endpoints": TENANTS * ENDPOINTS_PER_TENANT,
             "limit": LIMIT, "results": results, "cpu_count": os.cpu_count()},
        )  # fmt: skip
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
