"""Object storage against the real S3 server: presigned links signed for the public endpoint work there."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx

from core.settings import Settings
from core.storage import Storage


def test_presigned_links_name_the_public_endpoint_and_are_valid_there(
    settings: Settings, engine: Any
) -> None:
    internal = Storage.from_settings(settings)
    internal.put_bytes("public-url-test/result.png", b"\x89PNG fake", "image/png")
    port = urlsplit(settings.s3_endpoint_url).port
    # The same server under another host name stands in for the address clients reach (a proxy, a DNS name).
    public_url = f"http://localhost:{port}"
    public = Storage.from_settings(settings.with_overrides(s3_public_url=public_url))

    link = public.presign_get("public-url-test/result.png", 60)
    assert link.startswith(public_url + "/"), link
    assert httpx.get(link).content == b"\x89PNG fake"
    assert internal.presign_get("public-url-test/result.png", 60).startswith(settings.s3_endpoint_url + "/")
    # the signature covers the host: the public link rewritten to the internal host is refused
    assert httpx.get(link.replace(public_url, settings.s3_endpoint_url)).status_code == 403


def test_public_url_is_read_from_the_environment() -> None:
    env = {"S3_PUBLIC_URL": "https://files.example.com"}
    assert Settings.from_env(env).s3_public_url == "https://files.example.com"
    assert Settings.from_env({}).s3_public_url is None
    assert Settings.from_env(env).to_env()["S3_PUBLIC_URL"] == "https://files.example.com"
