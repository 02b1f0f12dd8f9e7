"""Object storage against the real S3 server: presigned links signed for the public endpoint work there."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx

from core.settings import Settings
from core.storage import Storage, presign_window_s


def test_presigned_links_name_the_public_endpoint_and_are_valid_there(
    settings: Settings, engine: Any
) -> None:
    internal = Storage.from_settings(settings)
    internal.put_bytes("public-url-test/result.png", b"\x89PNG fake", "image/png")
    port = urlsplit(settings.s3_endpoint_url).port
    # The same server under another host name stands in for the address clients reach (a proxy, a DNS name).
    public_url = f"http://localhost:{port}"
    public = Storage.from_settings(settings.with_overrides(s3_public_url=public_url))

    link = public.presign_get("public-url-test/result.png", 60).url
    assert link.startswith(public_url + "/"), link
    assert httpx.get(link).content == b"\x89PNG fake"
    internal_link = internal.presign_get("public-url-test/result.png", 60).url
    assert internal_link.startswith(settings.s3_endpoint_url + "/")
    # the signature covers the host: the public link rewritten to the internal host is refused
    assert httpx.get(link.replace(public_url, settings.s3_endpoint_url)).status_code == 403


def test_public_url_is_read_from_the_environment() -> None:
    env = {"S3_PUBLIC_URL": "https://files.example.com"}
    assert Settings.from_env(env).s3_public_url == "https://files.example.com"
    assert Settings.from_env({}).s3_public_url is None
    assert Settings.from_env(env).to_env()["S3_PUBLIC_URL"] == "https://files.example.com"


def test_a_link_is_handed_out_again_within_its_window_and_lives_out_its_ttl(
    settings: Settings, engine: Any
) -> None:
    storage = Storage.from_settings(settings)
    storage.put_bytes("window-test/a.png", b"a", "image/png")
    storage.put_bytes("window-test/b.png", b"b", "image/png")
    ttl = 3600
    window = presign_window_s(ttl)
    assert window == 60
    while time.time() % window > window - 2:  # not across the edge of a window
        time.sleep(0.5)
    before = datetime.now(UTC)
    first, again = (
        storage.presign_get("window-test/a.png", ttl),
        storage.presign_get("window-test/a.png", ttl),
    )
    other = storage.presign_get("window-test/b.png", ttl)
    assert again == first and other.url != first.url
    assert before + timedelta(seconds=ttl - window) <= first.expires_at <= before + timedelta(seconds=ttl)
    assert httpx.get(first.url).content == b"a" and httpx.get(other.url).content == b"b"
    # another lifetime is another link
    assert storage.presign_get("window-test/a.png", 600).url != first.url
    # short lifetimes get short windows, never none
    assert presign_window_s(60) == 6 and presign_window_s(5) == 1
