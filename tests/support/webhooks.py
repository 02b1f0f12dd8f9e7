"""Fixtures for webhook tests in every package: loopback receivers, a guard against any non-loopback
connection, a tenant with a signing secret, and helpers that start and finish a job.

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
from core.jobs import bucket_key, claim_batch, complete_job
from core.schema import jobs, tenants
from core.storage import result_key
from core.webhooks import new_secret
from nexusgen.receiver import Behaviour, WebhookReceiver


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
def webhook_tenant(engine: Any, clean_db: Any) -> dict[str, str]:
    """A tenant with a fresh signing secret, in an emptied database."""
    row = {"id": new_id("ten"), "name": f"acme-{new_id('n')}", "webhook_secret": new_secret()}
    with engine.begin() as conn:
        conn.execute(tenants.insert().values(**row))
    return row


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
    params = {"width": 64, "height": 64, "steps": 2, "cfg_scale": 2.0, "guidance": 3.5, "seed": 1}
    job_id = new_id("job")
    with engine.begin() as conn:
        conn.execute(
            jobs.insert().values(
                id=job_id,
                tenant_id=tenant_id,
                custom_id=custom_id,
                task="generate",
                prompt="a red fox",
                params=params,
                bucket=bucket_key("generate", params),
                metadata=metadata or {"order": 42},
                webhook_url=webhook_url,
                webhook_events=webhook_events,
            )
        )
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
