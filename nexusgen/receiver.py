"""A webhook receiver on loopback for the demo: verifies Standard Webhooks signatures and keeps the events."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    """One delivery as the receiver saw it."""

    webhook_id: str
    verified: bool
    payload: dict[str, Any] | None
    error: str | None = None


@dataclass
class WebhookReceiver:
    """An HTTP server on 127.0.0.1 (a free port) in a background thread; `url` is where to send events."""

    secret: str
    host: str = "127.0.0.1"
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Condition()
        self._webhook = Webhook(self.secret)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                status = receiver._accept(body, {k.lower(): v for k, v in self.headers.items()})
                self.send_response(status)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature of the base)
                return None

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="webhook-receiver", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._server.server_address[1]}/hooks"

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _accept(self, body: bytes, headers: dict[str, str]) -> int:
        webhook_id = headers.get("webhook-id", "")
        try:
            payload = self._webhook.verify(body, headers)
            item = Received(webhook_id, True, payload)
        except WebhookVerificationError as exc:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            item = Received(webhook_id, False, parsed, str(exc))
        with self._lock:
            self.received.append(item)
            self._lock.notify_all()
        return 204 if item.verified else 400

    def events(self) -> list[Received]:
        """Verified deliveries, one per webhook-id (retries of a delivery share its id)."""
        with self._lock:
            return self._events_locked()

    def rejected(self) -> list[Received]:
        with self._lock:
            return [item for item in self.received if not item.verified]

    def wait_for(self, predicate: Any, timeout_s: float) -> bool:
        """Block until predicate(self.events()) is true or the timeout passes; return whether it held."""
        with self._lock:
            return self._lock.wait_for(lambda: predicate(self._events_locked()), timeout=timeout_s)

    def _events_locked(self) -> list[Received]:
        unique: dict[str, Received] = {}
        for item in self.received:
            if item.verified:
                unique.setdefault(item.webhook_id, item)
        return list(unique.values())
