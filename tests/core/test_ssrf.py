"""The SSRF guard: refused URLs never get a connection; allowed ones are called at the checked address."""

from __future__ import annotations

import ipaddress
import shutil
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from core.sender import post_to_checked_url
from core.ssrf import (
    LookupTimedOut,
    WebhookURLRefused,
    address_refusal,
    check_webhook_url,
    resolve_webhook_url,
    use_resolver,
)

pytestmark = pytest.mark.usefixtures("outside_connections")  # tests never leave the machine


def _to_loopback(host: str, port: int) -> list[str]:
    return ["127.0.0.1"]


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("http://127.0.0.1:{port}/hook", "loopback_address"),
        ("http://localhost:{port}/hook", "loopback_address"),
        ("http://[::1]:{port6}/hook", "loopback_address"),
        ("http://[::ffff:127.0.0.1]:{port}/hook", "loopback_address"),
        ("http://127.1:{port}/hook", "loopback_address"),
        ("http://0.0.0.0:{port}/hook", "unspecified_address"),
        ("http://10.0.0.1/hook", "private_address"),
        ("http://172.16.0.1/hook", "private_address"),
        ("http://192.168.1.1/hook", "private_address"),
        ("http://169.254.169.254/latest/meta-data/", "metadata_address"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "metadata_address"),
        ("http://[::ffff:169.254.169.254]/", "metadata_address"),
        ("http://224.0.0.1/hook", "multicast_address"),
        ("http://100.64.0.1/hook", "non_global_address"),
        ("ftp://127.0.0.1/hook", "scheme_not_allowed"),
        ("file:///etc/passwd", "scheme_not_allowed"),
        ("http://user:pw@127.0.0.1:{port}/", "credentials_in_url"),
        ("http://hooks.example\\@127.0.0.1:{port}/", "credentials_in_url"),
        ("http://127.0.0.1:0/hook", "invalid_url"),
        ("http://hooks example/hook", "invalid_url"),
    ],
)
def test_refused_urls_never_connect(
    template: str, reason: str, make_receiver: Any, outside_connections: list[Any]
) -> None:
    listener = make_receiver()
    listener6 = make_receiver("::1")
    url = template.format(port=listener.port, port6=listener6.port)
    with pytest.raises(WebhookURLRefused) as info:
        check_webhook_url(url, allow_private=False)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)
    assert listener.connections == 0 and listener6.connections == 0
    assert outside_connections == []


def test_a_name_resolving_to_loopback_is_refused(make_receiver: Any) -> None:
    listener = make_receiver()
    with use_resolver(_to_loopback), pytest.raises(WebhookURLRefused) as info:
        check_webhook_url(f"http://hooks.customer.example:{listener.port}/x", allow_private=False)
    assert info.value.reason == "loopback_address"
    assert listener.connections == 0


def test_any_private_address_among_several_refuses_the_name() -> None:
    mixed = use_resolver(lambda host, port: ["93.184.216.34", "10.1.2.3"])
    with mixed, pytest.raises(WebhookURLRefused) as info:
        check_webhook_url("https://mixed.example/hook", allow_private=False)
    assert info.value.reason == "private_address"


def test_public_addresses_pass_without_any_connection(outside_connections: list[Any]) -> None:
    with use_resolver(lambda host, port: ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]):
        checked = resolve_webhook_url("https://public.example/hook", allow_private=False)
    assert checked.addresses == ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946")
    assert checked.port == 443 and checked.host == "public.example"
    assert address_refusal(ipaddress.ip_address("8.8.8.8")) is None
    assert outside_connections == []


def test_unresolvable_host_is_refused_with_its_own_reason() -> None:
    def fail(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    with use_resolver(fail), pytest.raises(WebhookURLRefused) as info:
        check_webhook_url("http://nowhere.invalid/", allow_private=False)
    assert info.value.reason == "unresolvable_host"


def test_a_stalled_lookup_is_given_up_at_the_deadline() -> None:
    release = threading.Event()

    def stall(host: str, port: int) -> list[str]:
        release.wait(10)  # a resolver that never answers (its own timeout is far away)
        return ["93.184.216.34"]

    t0 = time.monotonic()
    try:
        with pytest.raises(WebhookURLRefused) as info:
            resolve_webhook_url("http://slow-dns.example/", False, resolver=stall, deadline=t0 + 0.3)
    finally:
        release.set()
    assert info.value.reason == "unresolvable_host" and "deadline" in str(info.value)
    assert isinstance(info.value, LookupTimedOut)  # the resolver's trouble: a submission answers 503
    assert time.monotonic() - t0 < 1.0
    assert resolve_webhook_url("http://slow-dns.example/", False, resolver=stall, deadline=t0 + 5).addresses


def test_allow_private_sends_to_the_checked_address_with_original_host(make_receiver: Any) -> None:
    receiver = make_receiver()
    lookups: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"]

    with use_resolver(resolver):
        url = f"http://hooks.customer.example:{receiver.port}/in?x=1"
        checked = resolve_webhook_url(url, allow_private=True)
        outcome = post_to_checked_url(checked, b'{"a":1}', {"webhook-id": "msg_1"}, timeout_s=5)
    assert outcome.status_code == 200 and outcome.error is None
    assert lookups == ["hooks.customer.example"]  # resolved once; the send did not look it up again
    (request,) = receiver.received
    assert request.headers["host"] == f"hooks.customer.example:{receiver.port}"
    assert request.path == "/in?x=1" and request.body == b'{"a":1}'


def test_redirect_to_loopback_is_not_followed(make_receiver: Any) -> None:
    target = make_receiver()
    redirector = make_receiver(statuses=[302], headers={"location": f"{target.url}/stolen"})
    checked = resolve_webhook_url(redirector.url + "/hook", allow_private=True)
    outcome = post_to_checked_url(checked, b"{}", {}, timeout_s=5)
    assert outcome.status_code == 302
    assert outcome.error is not None and "redirect not followed" in outcome.error
    assert redirector.connections == 1
    assert target.connections == 0


def test_response_body_is_read_only_up_to_the_cap(make_receiver: Any) -> None:
    receiver = make_receiver(statuses=[500], body=b"x" * 1_000_000)
    outcome = post_to_checked_url(resolve_webhook_url(receiver.url, True), b"{}", {}, timeout_s=5)
    assert outcome.status_code == 500 and outcome.error == "HTTP 500"
    assert outcome.excerpt is not None and 0 < len(outcome.excerpt) <= 1000


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_goes_to_the_checked_address_with_the_original_sni(make_receiver: Any, tmp_path: Path) -> None:
    name = "hooks.customer.example"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", str(key)],
            *["-out", str(cert), "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}"],
        ],
        check=True,
        capture_output=True,
    )
    server_names: list[str | None] = []
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    server_tls.sni_callback = lambda sock, server_name, ctx: server_names.append(server_name)  # type: ignore[assignment,misc]
    receiver = make_receiver(tls=server_tls)
    with use_resolver(_to_loopback):
        checked = resolve_webhook_url(f"https://{name}:{receiver.port}/in", allow_private=True)

    untrusted = post_to_checked_url(checked, b"{}", {}, timeout_s=5)  # a self-signed cert is not trusted
    assert untrusted.status_code is None and "CERTIFICATE_VERIFY_FAILED" in (untrusted.error or "")

    client_tls = ssl.create_default_context(cafile=str(cert))  # now trust it: the name must match too
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("core.sender._ssl_context", client_tls)
        trusted = post_to_checked_url(checked, b"{}", {}, timeout_s=5)
    assert trusted.status_code == 200, trusted.error
    assert server_names == [name, name]
    assert receiver.received[0].headers["host"] == f"{name}:{receiver.port}"
