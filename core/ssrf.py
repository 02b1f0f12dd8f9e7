"""SSRF guard for webhook URLs: http(s), resolved once, public addresses only, sent to the checked address.

`check_webhook_url` is called at submission (the API answers 422 on refusal); `resolve_webhook_url` is
called again at delivery time and returns the checked addresses, so the sender connects to one of them
instead of resolving the name a second time (no DNS-rebinding window).
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import certifi
import httpcore
import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) -> the addresses the host resolves to, as strings.
Resolver = Callable[[str, int], list[str]]

# Cloud metadata services (AWS, GCP, Azure, OpenStack share the IPv4 one; AWS IPv6 for Nitro).
METADATA_ADDRESSES = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),
        ipaddress.ip_address("fd00:ec2::254"),
        ipaddress.ip_address("100.100.100.200"),
    }
)
# NAT64 maps IPv4 into IPv6; the embedded IPv4 address is what is finally reached.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class WebhookURLRefused(ValueError):
    """A webhook URL the service will not call; `.reason` is a machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class CheckedURL:
    """A webhook URL split into its parts, with the addresses that passed the check."""

    url: str
    scheme: str
    host: str  # the name as written (brackets stripped from IPv6 literals), for Host and SNI
    port: int
    addresses: tuple[str, ...]  # every address the host resolved to; all of them passed


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


_resolver: Resolver = _system_resolver


@contextmanager
def use_resolver(resolver: Resolver) -> Iterator[None]:
    """Replace name resolution for the duration of a `with` block (tests; split-horizon DNS)."""
    global _resolver
    previous, _resolver = _resolver, resolver
    try:
        yield
    finally:
        _resolver = previous


def address_refusal(address: IPAddress) -> str | None:
    """The reason an address may not be called with private networks disallowed, or None if it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return address_refusal(embedded)
    if address in METADATA_ADDRESSES:
        return "metadata_address"
    checks = (
        ("unspecified_address", address.is_unspecified),
        ("loopback_address", address.is_loopback),
        ("link_local_address", address.is_link_local),
        ("multicast_address", address.is_multicast),
        ("private_address", address.is_private),
        ("reserved_address", address.is_reserved),
    )
    for reason, hit in checks:
        if hit:
            return reason
    if not address.is_global:  # shared address space (100.64/10) and the like
        return "non_global_address"
    return None


def parse_webhook_url(url: str) -> tuple[str, str, int]:
    """Split a webhook URL into (scheme, host, port), refusing anything but plain http(s) URLs."""
    if not isinstance(url, str) or not url.strip():
        raise WebhookURLRefused("invalid_url", "the webhook URL is empty")
    if any(c.isspace() for c in url):
        raise WebhookURLRefused("invalid_url", "the webhook URL must not contain whitespace")
    if len(url) > 2048:
        raise WebhookURLRefused("invalid_url", "the webhook URL is longer than 2048 characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookURLRefused("invalid_url", f"the webhook URL cannot be parsed: {exc}") from exc
    if port == 0:
        raise WebhookURLRefused("invalid_url", "the webhook URL's port must be 1 to 65535")
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise WebhookURLRefused("scheme_not_allowed", f"webhook URLs must be http or https, got {scheme!r}")
    if parts.username is not None or parts.password is not None:
        raise WebhookURLRefused("credentials_in_url", "webhook URLs must not carry a user name or password")
    host = parts.hostname
    if not host:
        raise WebhookURLRefused("invalid_url", "the webhook URL has no host")
    try:
        sender_view = httpx.URL(url)  # what the sender will parse; refuse now what it would reject later
    except httpx.InvalidURL as exc:
        raise WebhookURLRefused("invalid_url", f"the webhook URL is not valid: {exc}") from exc
    if sender_view.host.lower() != host.lower() or (sender_view.port or port) != port:
        raise WebhookURLRefused(
            "invalid_url", "the webhook URL is ambiguous (its parsers disagree on the host)"
        )
    return scheme, host, port if port is not None else (443 if scheme == "https" else 80)


def resolve_webhook_url(url: str, allow_private: bool, resolver: Resolver | None = None) -> CheckedURL:
    """Resolve the URL's host once and refuse it if ANY address is not public (unless allow_private)."""
    scheme, host, port = parse_webhook_url(url)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        found = [str(literal)]
    else:
        try:
            found = (resolver or _resolver)(host, port)
        except (OSError, UnicodeError) as exc:
            raise WebhookURLRefused(
                "unresolvable_host", f"the webhook host {host!r} does not resolve: {exc}"
            ) from exc
        if not found:
            raise WebhookURLRefused("unresolvable_host", f"the webhook host {host!r} resolved to no address")
    addresses: list[str] = []
    for text in found:
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
        except ValueError as exc:
            raise WebhookURLRefused("unresolvable_host", f"the webhook host {host!r} gave {text!r}") from exc
        if not allow_private:
            reason = address_refusal(address)
            if reason is not None:
                raise WebhookURLRefused(
                    reason, f"the webhook host {host!r} resolves to {address} ({reason.replace('_', ' ')})"
                )
        addresses.append(str(address))
    return CheckedURL(url=url, scheme=scheme, host=host, port=port, addresses=tuple(addresses))


def check_webhook_url(url: str, allow_private: bool) -> None:
    """Raise WebhookURLRefused unless the URL is an http(s) URL whose host resolves to allowed addresses."""
    resolve_webhook_url(url, allow_private)


# --- sending to the checked address ---------------------------------------------------------------------

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
    return SendOutcome.failure(error, started_at, _ms(t0))


def _ms(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000.0, 1)
