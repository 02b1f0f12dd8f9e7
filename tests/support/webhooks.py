"""Fixtures for webhook tests in every package: loopback receivers, a guard against any non-loopback
connection, a tenant with a signing secret, settings for fast deliveries, and helpers that write an event
and start and finish a job.

A pytest plugin (tests/conftest.py names it); a test module that wants the guard says
`pytestmark = pytest.mark.usefixtures("outside_connections")`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from core.ids import new_id
from core.jobs import claim_batch, complete_job
from core.schema import tenants
from core.storage import result_key
from core.webhooks import enqueue_event, new_secret
from nexusgen.receiver import Behaviour, WebhookReceiver
from tests.worker.support import insert_job


@pytest.fixture
def outside_connections(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Fail any Python-level connect() to a non-loopback address (tests must never leave the machine)."""
    attempts: list[Any] = []
    original = socket.socket.connect

    def guarded(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            host = str(address[0])
            try:
                loopback = ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                attempts.append(address)
                raise OSError(f"test guard: refusing to connect to non-loopback {address!r}")
        original(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return attempts


@pytest.fixture
def make_receiver() -> Iterator[Callable[..., WebhookReceiver]]:
    """Start receivers on loopback (`make_receiver(statuses=[500, 200], delay_s=...)`, 200 by default:
    nexusgen.receiver.Behaviour); closed afterwards."""
    started: list[WebhookReceiver] = []

    def make(host: str = "127.0.0.1", port: int = 0, tls: Any = None, **behaviour: Any) -> WebhookReceiver:
        behaviour.setdefault("statuses", [200])
        receiver = WebhookReceiver(None, Behaviour(**behaviour), host=host, port=port, tls=tls)
        started.append(receiver)
        return receiver

    yield make
    for receiver in started:
        receiver.close()


@pytest.fixture
def fast_delivery(settings: Any) -> Any:
    """Settings with a short retry schedule and timeout, private networks allowed (loopback receivers)."""
    return settings.with_overrides(
        webhook_allow_private_networks=True, webhook_timeout_s=1.0, webhook_retry_schedule_s=(30.0, 60.0)
    )


@pytest.fixture
def webhook_tenant(engine: Any, clean_db: Any) -> dict[str, str]:
    """A tenant with a fresh signing secret, in an emptied database."""
    return add_tenant(engine)


def add_tenant(engine: Any) -> dict[str, str]:
    """Insert a tenant with a fresh signing secret; return its row."""
    row = {"id": new_id("ten"), "name": f"acme-{new_id('n')}", "webhook_secret": new_secret()}
    with engine.begin() as conn:
        conn.execute(tenants.insert().values(**row))
    return row


def webhook_event(engine: Any, tenant_id: str, url: str, n: int = 0) -> str:
    """Write a batch.completed event (data id `bat_<n>`) with a pending delivery to `url`; its id."""
    with engine.begin() as conn:
        event_id = enqueue_event(
            conn, tenant_id=tenant_id, event_type="batch.completed", data={"id": f"bat_{n}"}, url=url
        )
    assert event_id is not None
    return event_id


def start_job(
    engine: Any,
    tenant_id: str,
    *,
    webhook_url: str | None,
    webhook_events: list[str] | None = None,
    custom_id: str | None = "row-1",
    metadata: dict[str, Any] | None = None,
) -> tuple[str, int]:
    """Insert a queued generation job and claim it; return (job id, attempt)."""
    columns = {
        "custom_id": custom_id,
        "metadata": metadata or {"order": 42},
        "webhook_url": webhook_url,
        "webhook_events": webhook_events,
    }
    params = {"width": 64, "height": 64, "cfg_scale": 2.0, "seed": 1}
    job_id, _ = insert_job(engine, tenant_id, "generate", "a red fox", columns=columns, **params)
    with engine.begin() as conn:
        (claimed,) = claim_batch(conn, worker_id="test", tasks=["generate"], max_batch=1, lease_s=60)
    assert claimed.id == job_id
    return job_id, claimed.attempt


def succeed_job(engine: Any, job_id: str, attempt: int, tenant_id: str) -> None:
    """Finish a running job with an image result (the object itself is not needed by webhooks)."""
    result = {
        "kind": "image",
        "object_key": result_key(tenant_id, job_id, "png"),
        "content_type": "image/png",
        "size_bytes": 10,
        "sha256": "0" * 64,
        "width": 64,
        "height": 64,
    }
    with engine.begin() as conn:
        assert complete_job(conn, job_id, attempt, provenance={"seed": 1}, result=result)
