"""Delivery under hostile receivers: a whole-attempt deadline, a late 2xx kept, slots shared by tenants."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import select, update

from core.deliveries import claim_due
from core.schema import webhook_attempts, webhook_deliveries
from core.settings import Settings
from core.ssrf import use_resolver
from tests.support.webhooks import add_tenant, webhook_event
from worker.delivery import deliver_due, deliver_one

pytestmark = pytest.mark.usefixtures("outside_connections")  # tests never leave the machine


def test_a_trickling_receiver_is_cut_off_at_the_attempt_deadline(
    engine: Any, fast_delivery: Any, webhook_tenant: Any, make_receiver: Any
) -> None:
    trickler = make_receiver(trickle_s=0.25)  # each byte well inside the 1 s read timeout
    webhook_event(engine, webhook_tenant["id"], trickler.url)
    t0 = time.monotonic()
    counts = deliver_due(engine, fast_delivery)
    elapsed = time.monotonic() - t0
    # Every byte arrives well inside the 1 s read timeout; only a whole-attempt deadline stops it.
    assert elapsed < 2.5, f"one attempt took {elapsed:.1f} s against a 1 s deadline"
    assert counts == {"pending": 1}
    with engine.connect() as conn:
        delivery = conn.execute(select(webhook_deliveries)).mappings().one()
    assert delivery["attempts"] == 1 and "timed out" in delivery["last_error"]


def test_the_claim_lock_outlasts_a_whole_attempt() -> None:
    for timeout in (0.5, 10.0, 300.0):
        s = Settings(webhook_timeout_s=timeout)
        assert s.webhook_lock_s > timeout + 10
    with pytest.raises(ValueError, match="WEBHOOK_TIMEOUT_S"):
        Settings(webhook_timeout_s=0)
    with pytest.raises(ValueError, match="WEBHOOK_TIMEOUT_S"):
        Settings.from_env({"WEBHOOK_TIMEOUT_S": "-1"})


def test_a_2xx_that_arrives_after_the_lease_was_lost_is_kept(
    engine: Any, fast_delivery: Any, webhook_tenant: Any, make_receiver: Any
) -> None:
    receiver = make_receiver(statuses=[200, 500])
    webhook_event(engine, webhook_tenant["id"], receiver.url)
    with engine.begin() as conn:
        (claimed,) = claim_due(conn, limit=1, lock_s=60)
    with engine.begin() as conn:  # the lease ran out and another worker claimed the delivery
        conn.execute(
            update(webhook_deliveries).values(locked_until=claimed["locked_until"].replace(year=2099))
        )
    assert deliver_one(engine, fast_delivery, claimed) == "succeeded"
    with engine.connect() as conn:
        delivery = conn.execute(select(webhook_deliveries)).mappings().one()
        attempts = conn.execute(select(webhook_attempts)).mappings().all()
    assert delivery["status"] == "succeeded" and delivery["delivered_at"] is not None
    assert delivery["attempts"] == 1 and [a["status_code"] for a in attempts] == [200]
    # The other worker's attempt fails (HTTP 500) and is recorded later: it does not undo the success.
    assert deliver_one(engine, fast_delivery, claimed) == "pending"
    with engine.connect() as conn:
        assert conn.execute(select(webhook_deliveries.c.status)).scalar_one() == "succeeded"
        assert conn.execute(select(webhook_attempts.c.status_code)).scalars().all() == [200, 500]


def test_a_tenant_with_slow_receivers_behind_several_urls_leaves_slots_for_others(
    engine: Any, fast_delivery: Any, webhook_tenant: Any, make_receiver: Any
) -> None:
    patient = fast_delivery.with_overrides(webhook_timeout_s=3.0)
    slow = [make_receiver(delay_s=2.0) for _ in range(3)]
    for i in range(12):  # older than the other tenant's event, so first in line by age
        webhook_event(engine, webhook_tenant["id"], slow[i % 3].url + f"/u{i % 3}", i)
    other = add_tenant(engine)["id"]
    quick = make_receiver()
    webhook_event(engine, other, quick.url + "/quick", 99)
    t0 = time.monotonic()
    counts = deliver_due(engine, patient, max_parallel=8)
    assert quick.received, "the other tenant's event was never delivered"
    assert quick.received[0].at - t0 < 1.0, "the other tenant waited for the slow one's slots"
    assert counts == {"succeeded": 13}


def test_a_stalling_name_lookup_counts_against_the_attempt_deadline(
    engine: Any, fast_delivery: Any, webhook_tenant: Any
) -> None:
    release = threading.Event()

    def stall(host: str, port: int) -> list[str]:
        release.wait(20)  # like a resolver whose server never answers
        return ["127.0.0.1"]

    webhook_event(engine, webhook_tenant["id"], "http://hooks.stalling-dns.example/in")
    t0 = time.monotonic()
    try:
        with use_resolver(stall):
            counts = deliver_due(engine, fast_delivery)
    finally:
        release.set()
    elapsed = time.monotonic() - t0
    assert elapsed < 2.5, f"one attempt took {elapsed:.1f} s against a 1 s deadline"
    assert counts == {"pending": 1}  # retried later like any failed attempt
    with engine.connect() as conn:
        delivery = conn.execute(select(webhook_deliveries)).mappings().one()
    assert delivery["attempts"] == 1 and delivery["last_error"].startswith("unresolvable_host")
    assert "deadline" in delivery["last_error"]


def test_the_tenant_cap_holds_across_two_delivery_tasks(
    engine: Any, fast_delivery: Any, webhook_tenant: Any, make_receiver: Any
) -> None:
    patient = fast_delivery.with_overrides(webhook_timeout_s=3.0)
    slow = [make_receiver(delay_s=1.0) for _ in range(3)]
    for i in range(12):  # twelve endpoints of one tenant: only the tenant cap binds
        webhook_event(engine, webhook_tenant["id"], slow[i % 3].url + f"/u{i}", i)
    counts: list[dict[str, int]] = []
    tasks = [threading.Thread(target=lambda: counts.append(deliver_due(engine, patient))) for _ in range(2)]
    for task in tasks:  # two webhook workers, each with 8 slots
        task.start()
    for task in tasks:
        task.join(30)
    # Each request is answered 1 s after it arrived: count the answers pending at every arrival.
    arrivals = sorted(r.at for receiver in slow for r in receiver.received)
    in_flight = max(sum(1 for b in arrivals if a - 1.0 < b <= a) for a in arrivals)
    assert len(arrivals) == 12 and sum(c.get("succeeded", 0) for c in counts) == 12
    assert in_flight <= 4, f"{in_flight} attempts of one tenant in flight at once (cap 4)"
