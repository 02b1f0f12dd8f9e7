"""bench/bench_get.py's light load generator counts every answer, its status and its latency, over
keep-alive connections, against a real HTTP/1.1 server that splits head and body as gunicorn does."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from bench.bench_get import answer_size, run_reader


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    connections: ClassVar[set[int]] = set()

    def do_GET(self) -> None:
        _Handler.connections.add(id(self.connection))
        body = (b'{"id": "%s"}' % self.path.encode()) * (400 if "big" in self.path else 1)
        self.send_response(
            200 if self.headers["Authorization"] == "Bearer k" and "gone" not in self.path else 404
        )
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.flush()  # the head and the body in separate writes
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Handler.connections = set()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("client", ["raw", "httpx"])
def test_every_answer_is_counted_with_its_status(server: str, client: str) -> None:
    paths = ["/v1/jobs/a", "/v1/jobs/big", "/v1/jobs/gone"]
    result = run_reader(server, "k", paths, 300, 4, client)
    assert result["requests"] == 300 and result["connections"] == 4
    assert 40 < result["errors"] < 160  # about a third of the paths answer 404
    assert 0 < result["median_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert len(_Handler.connections) == 4  # keep-alive: one connection each, however many requests


def test_answer_size_waits_for_the_whole_answer() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nServer: x\r\n\r\nabcd"
    assert answer_size(bytearray(answer[:10])) is None
    assert answer_size(bytearray(answer[:-1])) is None
    assert answer_size(bytearray(answer + b"HTTP/1.1")) == (len(answer), True)
    last = b"HTTP/1.1 503 Unavailable\r\ncontent-length: 2\r\n\r\n{}"  # Content-Length the last header
    assert answer_size(bytearray(last)) == (len(last), False)
