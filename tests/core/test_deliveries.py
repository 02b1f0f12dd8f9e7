"""The webhook delivery state machine against a real PostgreSQL: leases, recorded attempts, 410, redeliver."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, RowMapping, func, select, update

from core import deliveries as sm
from core.records import DeliveryStatus
from core.schema import webhook_attempts, webhook_deliveries, webhook_endpoints
from core.sender import SendOutcome
from tests.support.webhooks import add_tenant, webhook_event

SCHEDULE = (30.0, 60.0)


def _events(engine: Engine, tenant_id: str, url: str, n: int = 1) -> None:
    for i in range(n):
        webhook_event(engine, tenant_id, url, i)


def _claim(engine: Engine, limit: int = 8, **kwargs: Any) -> list[RowMapping]:
    with engine.begin() as conn:
        return sm.claim_due(conn, limit=limit, lock_s=60, **kwargs)


def _record(engine: Engine, delivery: RowMapping, status_code: int | None, status: DeliveryStatus) -> None:
    outcome = SendOutcome(datetime.now(UTC), status_code, 5.0, None if status_code == 200 else "x", "")
    with engine.begin() as conn:
        sm.record_attempt(conn, delivery, outcome, status, 30.0 if status == DeliveryStatus.PENDING else None)


def _rows(engine: Engine) -> dict[str, RowMapping]:
    with engine.connect() as conn:
        return {r["id"]: r for r in conn.execute(select(webhook_deliveries)).mappings()}


def _lose_lease(engine: Engine, delivery_id: str) -> None:
    """The lease ran out and another worker claimed the delivery (a different locked_until)."""
    with engine.begin() as conn:
        conn.execute(
            update(webhook_deliveries)
            .where(webhook_deliveries.c.id == delivery_id)
            .values(locked_until=func.now() + timedelta(hours=1))
        )


def test_next_status_follows_the_outcome_and_the_schedule() -> None:
    def outcome(code: int | None) -> SendOutcome:
        return SendOutcome(datetime.now(UTC), code, 1.0, None, None)

    assert sm.next_status(outcome(204), 5, SCHEDULE) == (DeliveryStatus.SUCCEEDED, None)
    assert sm.next_status(outcome(410), 0, SCHEDULE) == (DeliveryStatus.DISABLED, None)
    status, delay = sm.next_status(outcome(500), 0, SCHEDULE)
    assert status == DeliveryStatus.PENDING and delay is not None and 24 <= delay <= 36
    status, delay = sm.next_status(outcome(None), 1, SCHEDULE)  # no answer at all
    assert status == DeliveryStatus.PENDING and delay is not None and 48 <= delay <= 72
    assert sm.next_status(outcome(302), 2, SCHEDULE) == (DeliveryStatus.DEAD, None)


def test_a_claim_leases_only_due_unleased_pending_deliveries(clean_db: Engine) -> None:
    engine = clean_db
    tenant = add_tenant(engine)["id"]
    _events(engine, tenant, "http://hooks.test/a", 4)
    ids = sorted(_rows(engine))
    with engine.begin() as conn:  # one not due yet, one already dead
        conn.execute(
            update(webhook_deliveries)
            .where(webhook_deliveries.c.id == ids[0])
            .values(next_attempt_at=func.now() + timedelta(minutes=5))
        )
        conn.execute(
            update(webhook_deliveries).where(webhook_deliveries.c.id == ids[1]).values(status="dead")
        )
    first = _claim(engine)
    assert sorted(d["id"] for d in first) == ids[2:]
    assert all(d["url"] == "http://hooks.test/a" and d["event_type"] == "batch.completed" for d in first)
    assert all(d["locked_until"] > datetime.now(UTC) + timedelta(seconds=50) for d in first)
    assert _claim(engine) == []  # leased: nobody else gets them
    assert [d["id"] for d in _claim(engine, exclude=ids[2:])] == []


def test_a_claim_takes_tenants_in_turn_within_the_caps(clean_db: Engine) -> None:
    engine = clean_db
    greedy, other = add_tenant(engine)["id"], add_tenant(engine)["id"]
    _events(engine, greedy, "http://hooks.test/one", 6)  # older: first in line by age
    _events(engine, greedy, "http://hooks.test/two", 6)
    _events(engine, other, "http://hooks.test/other", 2)
    claimed = _claim(engine, limit=8)
    by_tenant = [d["tenant_id"] for d in claimed]
    assert by_tenant.count(greedy) == sm.PER_TENANT_LIMIT and by_tenant.count(other) == 2
    one = [d for d in claimed if d["url"].endswith("/one")]
    assert len(one) <= sm.PER_ENDPOINT_LIMIT


def test_the_caps_hold_across_concurrent_claimers(clean_db: Engine) -> None:
    engine = clean_db
    tenant = add_tenant(engine)["id"]
    for i in range(10):  # ten endpoints: only the tenant cap can bind
        _events(engine, tenant, f"http://hooks.test/{i}")
    second: list[RowMapping] = []
    with engine.connect() as conn:
        with conn.begin():
            first = sm.claim_due(conn, limit=1, lock_s=60)
            # Another worker claims before this claim commits. The rows this one chose and looked at are
            # locked to it; the others are free, and their tenant shows nothing in flight yet.
            other = threading.Thread(target=lambda: second.extend(_claim(engine, limit=8)))
            other.start()
            other.join(1.0)
        other.join(30)
    assert not other.is_alive()
    assert len(first) + len(second) == sm.PER_TENANT_LIMIT
    assert _claim(engine, limit=8) == []  # a third claimer, later: every slot of the tenant is taken
    _record(engine, first[0], 200, DeliveryStatus.SUCCEEDED)  # a slot frees up, for whichever worker
    assert len(_claim(engine, limit=8)) == 1


def test_a_failure_moves_the_delivery_only_under_its_own_lease(clean_db: Engine) -> None:
    engine = clean_db
    _events(engine, add_tenant(engine)["id"], "http://hooks.test/a", 2)
    mine, lost = _claim(engine)
    _record(engine, mine, 500, DeliveryStatus.PENDING)
    _lose_lease(engine, lost["id"])
    _record(engine, lost, 500, DeliveryStatus.PENDING)
    rows = _rows(engine)
    assert rows[mine["id"]]["status"] == "pending" and rows[mine["id"]]["attempts"] == 1
    assert rows[mine["id"]]["locked_until"] is None and rows[mine["id"]]["last_status_code"] == 500
    assert rows[mine["id"]]["next_attempt_at"] > datetime.now(UTC) + timedelta(seconds=25)
    # The stale attempt is in the log, but the delivery belongs to the newer lease.
    assert rows[lost["id"]]["attempts"] == 0 and rows[lost["id"]]["locked_until"] is not None
    with engine.connect() as conn:
        logged = conn.execute(select(webhook_attempts.c.delivery_id, webhook_attempts.c.attempt)).all()
    assert sorted(logged) == sorted([(mine["id"], 1), (lost["id"], 1)])


def test_a_2xx_is_final_even_after_the_lease_was_lost_or_the_delivery_died(clean_db: Engine) -> None:
    engine = clean_db
    _events(engine, add_tenant(engine)["id"], "http://hooks.test/a", 2)
    late, dead = _claim(engine)
    _lose_lease(engine, late["id"])
    _record(engine, late, 200, DeliveryStatus.SUCCEEDED)
    with engine.begin() as conn:
        conn.execute(
            update(webhook_deliveries).where(webhook_deliveries.c.id == dead["id"]).values(status="dead")
        )
    _record(engine, dead, 200, DeliveryStatus.SUCCEEDED)
    _record(engine, late, 500, DeliveryStatus.PENDING)  # the other worker's failure, recorded later
    rows = _rows(engine)
    for delivery_id in (late["id"], dead["id"]):
        assert rows[delivery_id]["status"] == "succeeded" and rows[delivery_id]["delivered_at"] is not None
    assert rows[late["id"]]["last_status_code"] == 200


def test_a_410_disables_the_endpoint_and_its_pending_deliveries(clean_db: Engine) -> None:
    engine = clean_db
    tenant = add_tenant(engine)["id"]
    _events(engine, tenant, "http://hooks.test/gone", 3)
    _events(engine, tenant, "http://hooks.test/fine", 1)
    claimed = {d["url"]: d for d in _claim(engine, limit=1)}
    gone = claimed["http://hooks.test/gone"]
    _record(engine, gone, 410, DeliveryStatus.DISABLED)
    rows = _rows(engine)
    by_url: dict[str, list[str]] = {}
    with engine.connect() as conn:
        endpoints = {r.id: r for r in conn.execute(select(webhook_endpoints))}
    for row in rows.values():
        by_url.setdefault(endpoints[row["endpoint_id"]].url, []).append(row["status"])
    assert by_url == {"http://hooks.test/gone": ["disabled"] * 3, "http://hooks.test/fine": ["pending"]}
    gone_endpoint = endpoints[gone["endpoint_id"]]
    assert gone_endpoint.disabled_at is not None and "410" in gone_endpoint.disabled_reason
    _events(engine, tenant, "http://hooks.test/gone", 1)  # born disabled, never claimed
    assert [d["url"] for d in _claim(engine)] == ["http://hooks.test/fine"]

    with engine.begin() as conn:
        row = sm.redeliver(conn, tenant, gone["id"])
    assert row is not None and row["status"] == "pending" and row["attempts"] == 0
    with engine.connect() as conn:
        assert (
            conn.execute(
                select(webhook_endpoints.c.disabled_at).where(webhook_endpoints.c.id == gone["endpoint_id"])
            ).scalar_one()
            is None
        )
    assert [d["id"] for d in _claim(engine)] == [gone["id"]]


def test_a_claimed_delivery_of_a_disabled_endpoint_ends_without_an_attempt(clean_db: Engine) -> None:
    engine = clean_db
    _events(engine, add_tenant(engine)["id"], "http://hooks.test/a", 1)
    (delivery,) = _claim(engine)
    with engine.begin() as conn:
        sm.skip_disabled(conn, delivery["id"])
    row = _rows(engine)[delivery["id"]]
    assert row["status"] == "disabled" and row["attempts"] == 0 and row["locked_until"] is None
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(webhook_attempts)).scalar_one() == 0


def test_redeliver_refuses_while_an_attempt_is_in_flight(clean_db: Engine) -> None:
    engine = clean_db
    tenant = add_tenant(engine)["id"]
    _events(engine, tenant, "http://hooks.test/a", 1)
    (delivery,) = _claim(engine)
    with engine.begin() as conn, pytest.raises(ValueError, match="in flight"):
        sm.redeliver(conn, tenant, delivery["id"])
    with engine.begin() as conn:
        assert sm.redeliver(conn, "ten_someone_else", delivery["id"]) is None


def _expected_claim(rows: list[RowMapping], limit: int) -> list[str]:
    """The claim rule, spelled out over every row: each tenant's due, unleased deliveries ranked by due
    time (turn), taken turn by turn and then by due time, within the caps counting live leases."""
    now = datetime.now(UTC)
    leased = [r for r in rows if r["status"] == "pending" and r["locked_until"] and r["locked_until"] > now]
    per_endpoint = {r["endpoint_id"]: 0 for r in rows}
    per_tenant = {r["tenant_id"]: 0 for r in rows}
    for r in leased:
        per_endpoint[r["endpoint_id"]] += 1
        per_tenant[r["tenant_id"]] += 1
    due = sorted(
        (
            r
            for r in rows
            if r["status"] == "pending"
            and r["next_attempt_at"] <= now
            and (r["locked_until"] is None or r["locked_until"] < now)
        ),
        key=lambda r: r["next_attempt_at"],
    )
    turns: dict[str, int] = {}
    ranked = []
    for r in due:
        turns[r["tenant_id"]] = turns.get(r["tenant_id"], 0) + 1
        ranked.append((turns[r["tenant_id"]], r["next_attempt_at"], r))
    chosen: list[str] = []
    for _turn, _at, r in sorted(ranked, key=lambda x: (x[0], x[1])):
        if len(chosen) == limit:
            break
        if (
            per_endpoint[r["endpoint_id"]] >= sm.PER_ENDPOINT_LIMIT
            or per_tenant[r["tenant_id"]] >= sm.PER_TENANT_LIMIT
        ):
            continue
        per_endpoint[r["endpoint_id"]] += 1
        per_tenant[r["tenant_id"]] += 1
        chosen.append(r["id"])
    return chosen


def test_a_claim_takes_what_ranking_every_due_row_would_take(clean_db: Engine) -> None:
    """Each tenant's first due rows are every candidate the rule needs: claims match the rule spelled
    out over all rows, with leases live and expired, retries not yet due, finished deliveries, and five
    tenants at their cap holding the oldest due rows of all (a claim still finds the others)."""
    engine = clean_db
    rng = random.Random(7)
    tenants = [add_tenant(engine)["id"] for _ in range(12)]
    for t, tenant in enumerate(tenants):
        for i in range(rng.randint(1, 9)):
            _events(engine, tenant, f"http://hooks.test/{t}/{i % 3}")
    capped = tenants[:5]
    for tenant in capped:
        for i in range(sm.PER_TENANT_LIMIT):
            webhook_event(engine, tenant, f"http://hooks.test/in-flight/{tenant}", i)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        urls = dict(conn.execute(select(webhook_endpoints.c.id, webhook_endpoints.c.url)).all())
        for row in _rows(engine).values():
            values: dict[str, Any] = {"next_attempt_at": now - timedelta(seconds=rng.uniform(1, 3600))}
            roll = rng.random()
            if "/in-flight/" in urls[row["endpoint_id"]]:
                values["locked_until"] = now + timedelta(minutes=5)
            elif row["tenant_id"] in capped:
                values["next_attempt_at"] -= timedelta(days=1)  # first in line by age, but at the cap
            elif roll < 0.15:
                values["locked_until"] = now + timedelta(minutes=5)  # in flight
            elif roll < 0.2:
                values["locked_until"] = now - timedelta(minutes=5)  # a lease that ran out: due again
            elif roll < 0.3:
                values["next_attempt_at"] = now + timedelta(minutes=5)  # a retry, not due yet
            elif roll < 0.35:
                values["status"] = "succeeded"
            conn.execute(
                update(webhook_deliveries).where(webhook_deliveries.c.id == row["id"]).values(**values)
            )
    for limit in (1, 3, 8, 40):
        expected = _expected_claim(list(_rows(engine).values()), limit)
        with engine.connect() as conn, conn.begin():
            got = [d["id"] for d in sm.claim_due(conn, limit=limit, lock_s=60)]
            conn.rollback()
        assert expected
        assert sorted(got) == sorted(expected), limit
