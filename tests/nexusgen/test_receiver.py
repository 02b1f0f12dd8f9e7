"""The one webhook receiver (demo and tests): signatures verified with standardwebhooks, answers as told,
and an answer the sender gave up on is not counted as one it got."""

from __future__ import annotations

import time

import httpx
import pytest

from core.webhooks import new_secret, sign_headers
from nexusgen.receiver import Behaviour, Received, WebhookReceiver


def _post(receiver: WebhookReceiver, secret: str, msg_id: str, body: str, timeout: float = 5) -> int:
    headers = {**sign_headers([secret], msg_id, body), "content-type": "application/json"}
    return httpx.post(receiver.url, content=body, headers=headers, timeout=timeout).status_code


def _settled(receiver: WebhookReceiver, n: int, timeout_s: float = 10) -> list[Received]:
    """The first `n` requests once each one's answer is over (sent, or given up on)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        items = receiver.received[:n]
        if len(items) == n and all(r.answered for r in items):
            return items
        time.sleep(0.05)
    raise TimeoutError(f"{n} requests were not answered")


def test_the_demo_receiver_verifies_signatures_and_keeps_one_event_per_id() -> None:
    secret = new_secret()
    with WebhookReceiver(secret, path="/hooks") as receiver:
        assert receiver.url.endswith("/hooks")
        assert _post(receiver, secret, "msg_1", '{"type":"job.succeeded","data":{"id":"job_1"}}') == 204
        assert _post(receiver, secret, "msg_1", '{"type":"job.succeeded","data":{"id":"job_1"}}') == 204
        assert _post(receiver, new_secret(), "msg_2", '{"type":"job.failed","data":{}}') == 400
        assert receiver.wait_for(lambda events: len(events) == 1, timeout_s=5)
        (event,) = receiver.events()
        assert event.verified and event.payload == {"type": "job.succeeded", "data": {"id": "job_1"}}
        (rejected,) = receiver.rejected()
        assert rejected.webhook_id == "msg_2" and rejected.error and rejected.payload is not None
        assert [r.status for r in _settled(receiver, 3)] == [204, 204, 400]


def test_statuses_per_request_or_per_event_and_extra_headers() -> None:
    secret = new_secret()
    flaky = Behaviour(statuses=[500, 200], per_event=True, headers={"X-Test": "1"})
    with WebhookReceiver(secret, flaky) as receiver:
        codes = [_post(receiver, secret, msg, "{}") for msg in ("msg_a", "msg_b", "msg_a", "msg_a")]
        assert codes == [500, 500, 200, 200]
    redirect = Behaviour(statuses=[302], headers={"Location": "http://127.0.0.1:9/x"})
    with WebhookReceiver(None, redirect) as receiver:
        answer = httpx.post(receiver.url, content=b"{}", follow_redirects=False, timeout=5)
        assert answer.status_code == 302 and answer.headers["location"] == "http://127.0.0.1:9/x"
        assert receiver.received[0].verified is False  # no secret: nothing to verify with


@pytest.mark.parametrize(
    "behaviour",
    [Behaviour(statuses=[200], delay_s=1.0), Behaviour(statuses=[200], trickle_s=0.5)],
    ids=["slow", "trickle"],
)
def test_an_answer_the_sender_gave_up_on_is_not_a_2xx_it_got(behaviour: Behaviour) -> None:
    secret = new_secret()
    with WebhookReceiver(secret, behaviour) as receiver:
        with pytest.raises(httpx.TimeoutException):
            _post(receiver, secret, "msg_1", "{}", timeout=0.3)  # gives up long before the answer ends
        (item,) = _settled(receiver, 1)
        assert item.status is None and receiver.repeated_after_2xx() == 0
        receiver.behaviour = Behaviour(statuses=[200])
        assert _post(receiver, secret, "msg_1", "{}") == 200
        assert _post(receiver, secret, "msg_1", "{}") == 200
        assert [r.status for r in _settled(receiver, 3)] == [None, 200, 200]
        assert receiver.repeated_after_2xx() == 1  # the third request came after a 2xx the sender got
