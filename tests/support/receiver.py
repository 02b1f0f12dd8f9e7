"""A real webhook receiver for tests: a threaded HTTP server on loopback that records what it gets."""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Received:
    """One request as the receiver saw it."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when the body was read


@dataclass
class Behaviour:
    """What the receiver answers: a status per request (the last one repeats), an optional delay."""

    statuses: list[int] = field(default_factory=lambda: [200])
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type, family: int) -> None:
        self.address_family = family
        self.connections = 0
        super().__init__(address, handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn = super().get_request()
        self.connections += 1
        return conn


class Receiver:
    """A started receiver: `url` is its base URL, `received` its requests, `connections` its TCP accepts."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        behaviour: Behaviour | None = None,
        port: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.behaviour = behaviour or Behaviour()
        self.received: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                with receiver._lock:
                    index = len(receiver.received)
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    receiver.received.append(Received(self.path, headers, body, time.monotonic()))
                    b = receiver.behaviour
                    status = b.statuses[min(index, len(b.statuses) - 1)]
                if b.delay_s:
                    time.sleep(b.delay_s)
                try:
                    self.send_response(status)
                    for k, v in b.headers.items():
                        self.send_header(k, v)
                    self.send_header("content-length", str(len(b.body)))
                    self.end_headers()
                    self.wfile.write(b.body)
                except (BrokenPipeError, ConnectionResetError):
                    return  # the sender gave up (timeout): expected in slow-receiver tests

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server API
                return

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.server = _Server((host, port), Handler, family)
        self.host = host
        self.port = int(self.server.server_address[1])
        self.scheme = "http"
        if tls is not None:  # the handshake runs on accept, in the serving thread
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def connections(self) -> int:
        return self.server.connections

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    """A loopback port nobody listens on (for a receiver that is down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
