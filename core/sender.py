"""The bounded HTTP attempt of a webhook delivery: one POST to an address the SSRF guard checked.

One deadline covers the whole attempt (connect, send, status line, headers, body excerpt); it is enforced
through httpcore's network-backend interface, since per-operation timeouts bound each read, not the sum.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import certifi
import httpcore
import httpx

from core.ssrf import CheckedURL

USER_AGENT = "nexusgen-webhooks/1"
RESPONSE_READ_LIMIT = 4096  # bytes of a receiver's answer we read; the rest is dropped unread
EXCERPT_CHARS = 1000
_ssl_context: ssl.SSLContext | None = None


@dataclass(frozen=True)
class SendOutcome:
    """What one attempt produced: a status code (any answer at all) or an error, and a response excerpt."""

    started_at: datetime
    status_code: int | None
    latency_ms: float | None
    error: str | None
    excerpt: str | None

    @classmethod
    def failure(
        cls, error: str, started_at: datetime | None = None, latency_ms: float | None = None
    ) -> SendOutcome:
        return cls(started_at or datetime.now(UTC), None, latency_ms, error[:2000], None)


def _tls() -> ssl.SSLContext:
    global _ssl_context
    if _ssl_context is None:  # built once: loading the CA bundle costs tens of milliseconds
        _ssl_context = ssl.create_default_context(cafile=certifi.where())
    return _ssl_context


class _DeadlineStream(httpcore.NetworkStream):
    """A socket stream whose every read and write may wait only until one shared deadline.

    Per-operation timeouts bound each read, not the attempt: a receiver that trickles its headers a byte
    a second never trips them. Capping each wait at the time left bounds connect + send + headers + body.
    """

    def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
        self._inner, self._deadline = inner, deadline

    def _left(self, timeout: float | None, exc: type[Exception]) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise exc("the attempt's deadline passed")
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        left = self._left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, left), self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.SyncBackend):
    """httpcore's socket backend with every operation capped by the attempt's deadline."""

    def __init__(self, deadline: float) -> None:
        self._deadline = deadline

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise httpcore.ConnectTimeout("the attempt's deadline passed")
        timeout = left if timeout is None else min(timeout, left)
        stream = super().connect_tcp(host, port, timeout, local_address, socket_options)
        return _DeadlineStream(stream, self._deadline)


def _deadline_transport(deadline: float) -> httpx.HTTPTransport:
    """An httpx transport (no keep-alive, our CA bundle) whose sockets never wait past `deadline`."""
    transport = httpx.HTTPTransport(verify=_tls(), trust_env=False)
    # httpx takes no network backend argument; its pool (httpcore, public API) does.
    transport._pool = httpcore.ConnectionPool(
        ssl_context=_tls(), max_keepalive_connections=0, network_backend=_DeadlineBackend(deadline)
    )
    return transport


def _read_capped(response: httpx.Response, limit: int, deadline: float) -> tuple[bytes, str | None]:
    buf = bytearray()
    try:
        for chunk in response.iter_raw():
            buf.extend(chunk)
            if len(buf) >= limit or time.monotonic() > deadline:
                break
    except httpx.HTTPError as exc:  # the status line arrived; a broken body only shortens the excerpt
        return bytes(buf[:limit]), f"{type(exc).__name__}: {exc}"
    return bytes(buf[:limit]), None


def post_to_checked_url(
    checked: CheckedURL,
    body: bytes,
    headers: dict[str, str],
    timeout_s: float,
    deadline: float | None = None,
) -> SendOutcome:
    """POST `body` to one of the checked addresses with the original Host header and TLS server name.

    The whole attempt (connect, send, status line, headers, body excerpt) ends by `deadline` (a
    time.monotonic() value; default: `timeout_s` from now). No redirects are followed (a 3xx is a
    failure), no proxy from the environment is used, at most RESPONSE_READ_LIMIT bytes of the answer are
    read, and no connection is reused across calls.
    """
    url = httpx.URL(checked.url)
    extensions = {"sni_hostname": url.raw_host.decode("ascii")} if checked.scheme == "https" else {}
    send_headers = {
        **headers,
        "host": url.netloc.decode("ascii"),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }
    started_at = datetime.now(UTC)
    t0 = time.monotonic()
    deadline = t0 + timeout_s if deadline is None else deadline
    error = "no address to connect to"
    with httpx.Client(
        timeout=httpx.Timeout(timeout_s),
        follow_redirects=False,
        trust_env=False,
        transport=_deadline_transport(deadline),
    ) as client:
        for address in checked.addresses[:2]:  # a second address only if the first refuses to connect
            request = client.build_request(
                "POST", url.copy_with(host=address), content=body, headers=send_headers, extensions=extensions
            )
            try:
                response = client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                error = f"connect to {address} failed: {type(exc).__name__}: {exc}"
                continue
            except httpx.TimeoutException as exc:
                return SendOutcome.failure(f"timed out: {type(exc).__name__}", started_at, _ms(t0))
            except httpx.HTTPError as exc:
                return SendOutcome.failure(f"{type(exc).__name__}: {exc}", started_at, _ms(t0))
            return _answer(response, started_at, t0, deadline)
    return SendOutcome.failure(error, started_at, _ms(t0))


def _answer(response: httpx.Response, started_at: datetime, t0: float, deadline: float) -> SendOutcome:
    """The outcome of an answered attempt: its status, an excerpt of its body read by the deadline."""
    try:
        latency = _ms(t0)
        raw, body_error = _read_capped(response, RESPONSE_READ_LIMIT, deadline)
    finally:
        response.close()
    status = response.status_code
    excerpt = raw.decode("utf-8", errors="replace")[:EXCERPT_CHARS]
    if body_error:
        excerpt += f" [body read failed: {body_error}]"
    failure: str | None = None
    if 300 <= status < 400:
        location = response.headers.get("location", "")[:500]
        failure = f"redirect not followed (HTTP {status}, Location: {location})"
    elif not 200 <= status < 300:
        failure = f"HTTP {status}"
    return SendOutcome(started_at, status, latency, failure, excerpt)


def _ms(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000.0, 1)
