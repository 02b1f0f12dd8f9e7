"""Webhook receivers for the chaos runs: well-behaved, flaky, slow, trickling, 410, redirecting, or down.

Each logs every request it gets (webhook-id and the status it answered), so a run can count deliveries
repeated after a 2xx from the receivers' side.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Hit:
    webhook_id: str
    status: int | None  # None: the receiver never finished its answer (slow, trickling)
    at: float


@dataclass
class ChaosReceiver:
    """A raw-socket HTTP receiver; `mode` is ok | flaky | slow | trickle | gone | redirect | down."""

    mode: str
    hits: list[Hit] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _seen: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}/{self.mode}"
        self.closed = False
        if self.mode == "down":
            self.sock.close()  # nothing listens on the port
            return
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _read_request(self, conn: socket.socket) -> str:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("latin1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        return headers.get("webhook-id", "")

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                webhook_id = self._read_request(conn)
            except OSError:
                return
            with self._lock:
                first = webhook_id not in self._seen
                self._seen.add(webhook_id)
            status: int | None = {"ok": 200, "gone": 410, "redirect": 302}.get(self.mode)
            if self.mode == "flaky":
                status = 500 if first else 200
            try:
                if self.mode == "slow":
                    time.sleep(4.0)  # longer than the attempt deadline: the sender is gone by now,
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                    status = None  # so this late 200 is not a 2xx the sender saw
                elif self.mode == "trickle":
                    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + b"X-Pad: " + b"x" * 40:
                        conn.sendall(bytes([byte]))
                        time.sleep(0.5)
                    status = None
                else:
                    extra = "Location: http://127.0.0.1:9/elsewhere\r\n" if status == 302 else ""
                    head = f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n{extra}Connection: close\r\n\r\n"
                    conn.sendall(head.encode() + b"ok")
            except OSError:
                status = None  # the sender gave up first (slow, trickle)
            with self._lock:
                self.hits.append(Hit(webhook_id, status, time.monotonic()))

    def repeated_after_2xx(self) -> int:
        """Requests for a webhook-id that this receiver had already answered with a 2xx."""
        with self._lock:
            hits = sorted(self.hits, key=lambda h: h.at)
        done: set[str] = set()
        repeats = 0
        for hit in hits:
            if hit.webhook_id in done:
                repeats += 1
            if hit.status is not None and 200 <= hit.status < 300:
                done.add(hit.webhook_id)
        return repeats

    def close(self) -> None:
        self.closed = True
        self.sock.close()
