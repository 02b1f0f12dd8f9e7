"""A webhook receiver on loopback, for the demo and the tests: verifies Standard Webhooks signatures,
keeps what it gets, and answers as told (a status per request, slowly, trickling, with extra headers).

The demo runs it with defaults (204 for a verified event, 400 otherwise). The tests run the hostile kinds
a service meets (`Behaviour`): down then up on a fixed port, 5xx then 2xx, 410, a redirect, an answer
slower than the sender's deadline, headers trickled a byte at a time, TLS, IPv6.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    """One request as the receiver saw it, and what it answered."""

    webhook_id: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    at: float  # time.monotonic() when the body had been read
    verified: bool  # the signature checked out (False too when the receiver has no secret)
    payload: dict[str, Any] | None
    error: str | None = None  # why verification failed
    status: int | None = None  # the status the sender got; None if it gave up first (or not yet answered)
    answered: bool = False  # the answer is over: sent, or given up on


@dataclass
class Behaviour:
    """How the receiver answers.

    statuses: one per request in arrival order, the last repeating (per webhook-id if `per_event`);
    empty: 204 for a verified event, 400 otherwise (without a secret, 204). delay_s: wait before
    answering. trickle_s: send the answer a byte at a time, this far apart.
    """

    statuses: list[int] = field(default_factory=list)
    per_event: bool = False
    delay_s: float = 0.0
    trickle_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], family: int) -> None:
        self.address_family = family
        self.connections = 0
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn = super().get_request()
        self.connections += 1
        return conn


def _peer_gone(sock: socket.socket) -> bool:
    """Whether the sender has closed its side (given up) before we answered."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, ValueError):  # nothing to read yet; a TLS socket cannot peek: assume present
        return False
    except OSError:
        return True


class WebhookReceiver:
    """An HTTP server in a background thread; `url` is where to send events, `received` what came."""

    def __init__(
        self,
        secret: str | None = None,
        behaviour: Behaviour | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = "",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.behaviour = behaviour or Behaviour()
        self.received: list[Received] = []
        self._webhook = Webhook(secret) if secret else None
        self._lock = threading.Condition()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._server = _Server((host, port), self._handler(), family)
        self.host, self.port, self.path = host, int(self._server.server_address[1]), path
        self.scheme = "http"
        if tls is not None:  # the handshake runs on accept, in the serving thread
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="webhook-receiver", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"

    @property
    def connections(self) -> int:
        """TCP connections accepted so far."""
        return self._server.connections

    def __enter__(self) -> WebhookReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- what arrived ---------------------------------------------------------------------------------

    def events(self) -> list[Received]:
        """Verified deliveries, one per webhook-id (retries of a delivery share its id)."""
        with self._lock:
            return self._events_locked()

    def rejected(self) -> list[Received]:
        with self._lock:
            return [item for item in self.received if not item.verified]

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout_s: float) -> bool:
        """Block until predicate(self.events()) is true or the timeout passes; return whether it held."""
        with self._lock:
            return self._lock.wait_for(lambda: predicate(self._events_locked()), timeout=timeout_s)

    def repeated_after_2xx(self) -> int:
        """Requests for a webhook-id that this receiver had already answered with a 2xx the sender got."""
        with self._lock:
            items = sorted(self.received, key=lambda r: r.at)
        done: set[str] = set()
        repeats = 0
        for item in items:
            if item.webhook_id in done:
                repeats += 1
            if item.status is not None and 200 <= item.status < 300:
                done.add(item.webhook_id)
        return repeats

    def _events_locked(self) -> list[Received]:
        unique: dict[str, Received] = {}
        for item in self.received:
            if item.verified:
                unique.setdefault(item.webhook_id, item)
        return list(unique.values())

    # --- answering ------------------------------------------------------------------------------------

    def _take(self, path: str, headers: dict[str, str], body: bytes) -> tuple[Received, int]:
        """Verify and keep one request; return it with the status to answer."""
        webhook_id = headers.get("webhook-id", "")
        verified, payload, error = False, None, None
        if self._webhook is not None:
            try:
                payload, verified = self._webhook.verify(body, headers), True
            except WebhookVerificationError as exc:
                error = str(exc)
        if payload is None:
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None
        item = Received(webhook_id, path, headers, body, time.monotonic(), verified, payload, error)
        with self._lock:
            b = self.behaviour
            earlier = (
                [r for r in self.received if r.webhook_id == webhook_id] if b.per_event else self.received
            )
            if b.statuses:
                status = b.statuses[min(len(earlier), len(b.statuses) - 1)]
            else:
                status = 204 if verified or self._webhook is None else 400
            self.received.append(item)
            self._lock.notify_all()
        return item, status

    def _answered(self, item: Received, status: int | None) -> None:
        with self._lock:
            item.status, item.answered = status, True
            self._lock.notify_all()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                item, status = receiver._take(self.path, headers, body)
                b = receiver.behaviour
                if b.delay_s:
                    time.sleep(b.delay_s)
                if _peer_gone(self.connection):  # the sender's deadline passed: it never sees an answer
                    receiver._answered(item, None)
                    return
                try:
                    reason = HTTPStatus(status).phrase
                except ValueError:
                    reason = "Unknown"
                extra = "".join(f"{k}: {v}\r\n" for k, v in b.headers.items())
                answer = (
                    f"HTTP/1.1 {status} {reason}\r\n{extra}Content-Length: {len(b.body)}\r\n"
                    "Connection: close\r\n\r\n"
                ).encode("latin-1") + b.body
                self.close_connection = True
                try:
                    if b.trickle_s:
                        for i in range(len(answer)):
                            self.wfile.write(answer[i : i + 1])
                            time.sleep(b.trickle_s)
                            if _peer_gone(self.connection):
                                receiver._answered(item, None)
                                return
                    else:
                        self.wfile.write(answer)
                except OSError:  # the sender gave up while we wrote
                    receiver._answered(item, None)
                    return
                receiver._answered(item, status)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature of the base)
                return None

        return Handler
