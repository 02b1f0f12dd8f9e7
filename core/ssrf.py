"""SSRF guard for webhook URLs: http(s) only, the host resolved once, public addresses only.

`check_webhook_url` is called at submission (the API answers 422 on refusal); `resolve_webhook_url` is
called again at delivery time and returns the checked addresses, so the sender (core/sender.py) connects
to one of them instead of resolving the name a second time (no DNS-rebinding window).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

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


class LookupTimedOut(WebhookURLRefused):
    """The host's name lookup gave no verdict: no answer by the deadline, or the resolver's "try again"
    (EAI_AGAIN, its upstream servers unreachable). The resolver's trouble, not a verdict on the URL. Its
    reason stays `unresolvable_host`, which a delivery retries like any failed attempt."""


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


def _resolve_by(resolver: Resolver, host: str, port: int, deadline: float | None) -> list[str]:
    """resolver(host, port), given up on at `deadline` (a time.monotonic() value; None: no bound).

    getaddrinfo cannot be interrupted, so a bounded lookup runs in a daemon thread of its own that is left
    to finish (or hang) alone past the deadline: a stalled resolver costs a thread for its own timeout,
    never the attempt's time or another attempt's lookup.
    """
    if deadline is None:
        return resolver(host, port)
    answer: list[list[str] | Exception] = []

    def lookup() -> None:
        try:
            answer.append(resolver(host, port))
        except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread below
            answer.append(exc)

    thread = threading.Thread(target=lookup, name=f"resolve {host}", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if not answer:
        raise TimeoutError("no answer by the deadline")
    if isinstance(answer[0], Exception):
        raise answer[0]
    return answer[0]


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


def resolve_webhook_url(
    url: str, allow_private: bool, resolver: Resolver | None = None, deadline: float | None = None
) -> CheckedURL:
    """Resolve the URL's host once and refuse it if ANY address is not public (unless allow_private).

    A lookup still unanswered at `deadline` (time.monotonic(): the delivery attempt's, or the submission
    check's) raises LookupTimedOut, reason `unresolvable_host`, which the delivery retries like any failed
    attempt and a submission answers 503.
    """
    scheme, host, port = parse_webhook_url(url)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        found = [str(literal)]
    else:
        try:
            found = _resolve_by(resolver or _resolver, host, port, deadline)
        except TimeoutError as exc:
            raise LookupTimedOut(
                "unresolvable_host", f"the webhook host {host!r} does not resolve: {exc}"
            ) from exc
        except (OSError, UnicodeError) as exc:
            if isinstance(exc, socket.gaierror) and exc.errno == socket.EAI_AGAIN:  # "try again": no verdict
                raise LookupTimedOut(
                    "unresolvable_host", f"the webhook host {host!r} could not be looked up now: {exc}"
                ) from exc
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


def check_webhook_url(url: str, allow_private: bool, deadline: float | None = None) -> None:
    """Raise WebhookURLRefused unless the URL is an http(s) URL whose host resolves to allowed addresses
    (LookupTimedOut if the lookup has not answered by `deadline`, a time.monotonic() value)."""
    resolve_webhook_url(url, allow_private, deadline=deadline)
