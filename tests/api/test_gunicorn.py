"""The API under real gunicorn: its own pre-app answers (414, 431, 400) are our JSON error object."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from nexusgen.embedded import free_port


@pytest.fixture
def api_url(settings: Any, engine: Any, tmp_path: Any) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        **settings.with_overrides(api_port=port, state_dir=tmp_path).to_env(),
        "PYTHONPATH": os.getcwd(),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexusgen.cli", "api", "--workers", "1", "--threads", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise AssertionError("the API did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def raw_request(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def test_gunicorns_own_errors_are_json(api_url: str) -> None:
    long_uri = b"GET /v1/jobs/" + b"x" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    big_header = b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"y" * 9000 + b"\r\n\r\n"
    garbage = b"NOT HTTP AT ALL\r\n\r\n"
    for request, status, code in (
        (long_uri, 414, "uri_too_long"),
        (big_header, 431, "header_fields_too_large"),
        (garbage, 400, "bad_request"),
    ):
        got, headers, body = raw_request(api_url, request)
        assert got == status and headers["content-type"] == "application/json", (status, body[:200])
        assert httpx.Response(200, content=body).json()["error"]["code"] == code
