"""POST /v1/uploads: round trip through object storage with its checksum, and every refusal."""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import zlib
from typing import Any

import pytest
from PIL import ExifTags, Image

from core.storage import Storage, upload_key
from tests.api.conftest import Tenant, png_bytes, upload


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels, with almost no data (decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_upload_round_trip_with_checksum(client: Any, acme: Tenant, settings: Any, fmt: str) -> None:
    data = png_bytes(70, 50, fmt=fmt)
    r = upload(client, acme, data)
    assert r.status_code == 201, r.get_json()
    body = r.get_json()
    assert body["id"].startswith("upl_") and (body["width"], body["height"]) == (70, 50)
    assert body["sha256"] == hashlib.sha256(data).hexdigest() and body["size_bytes"] == len(data)
    stored = Storage.from_settings(settings).get_bytes(upload_key(acme.id, body["id"]))
    assert stored == data


@pytest.mark.parametrize(
    ("orientation", "size"), [(None, (64, 32)), (1, (64, 32)), (3, (64, 32)), (6, (32, 64)), (8, (32, 64))]
)
def test_upload_records_the_size_as_shown(
    client: Any, acme: Tenant, orientation: int | None, size: Any
) -> None:
    """EXIF orientations 5-8 turn a photo a quarter: the recorded size is the upright one, as the worker
    and viewers show it; the stored bytes stay as sent."""
    exif = Image.Exif()
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    for fmt in ("JPEG", "PNG", "WEBP"):
        buf = io.BytesIO()
        Image.new("RGB", (64, 32), "red").save(buf, fmt, exif=exif.tobytes())
        r = upload(client, acme, buf.getvalue())
        assert r.status_code == 201, r.get_json()
        assert (r.get_json()["width"], r.get_json()["height"]) == size, fmt


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "invalid_image"),
        (b"hello, not an image", "unsupported_image_format"),
        (png_bytes()[:40], "invalid_image"),
        (_bomb_png(20000, 20000), "image_too_large"),
        (_bomb_png(9000, 9000), "image_too_large"),
    ],
)
def test_bad_uploads_are_refused(client: Any, acme: Tenant, data: bytes, code: str) -> None:
    r = upload(client, acme, data)
    assert r.status_code == 422 and r.get_json()["error"]["code"] == code, r.get_json()


def test_gif_is_unsupported(client: Any, acme: Tenant) -> None:
    buf = io.BytesIO()
    Image.new("P", (8, 8)).save(buf, "GIF")
    r = upload(client, acme, buf.getvalue())
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "unsupported_image_format"


def test_pixel_and_byte_limits(settings: Any, engine: Any, clean_db: Any, acme: Tenant) -> None:
    from api.app import create_app

    client = create_app(settings.with_overrides(max_image_pixels=1000, max_upload_bytes=5000)).test_client()
    r = upload(client, acme, png_bytes(40, 40))
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "image_too_large"
    noisy = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    buf = io.BytesIO()
    noisy.save(buf, "PNG")
    r = upload(client, acme, buf.getvalue())
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "image_too_large"


def test_missing_file_field(client: Any, acme: Tenant) -> None:
    r = client.post(
        "/v1/uploads", data={"other": "x"}, headers=acme.headers, content_type="multipart/form-data"
    )
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "invalid_image"


def test_body_over_the_limit_is_413(settings: Any, engine: Any, clean_db: Any, acme: Tenant) -> None:
    from api.app import create_app

    client = create_app(settings.with_overrides(max_body_bytes=1000)).test_client()
    r = upload(client, acme, png_bytes(200, 200, color="blue") + b"\0" * 2000)
    assert r.status_code == 413 and r.get_json()["error"]["code"] == "payload_too_large"
    r = client.post(
        "/v1/jobs", data=b"x" * 5000, headers={**acme.headers, "Content-Type": "application/json"}
    )
    assert r.status_code == 413 and r.get_json()["error"]["code"] == "payload_too_large"


def test_decompression_bomb_warning_is_an_error(
    settings: Any, engine: Any, clean_db: Any, acme: Tenant
) -> None:
    """Above PIL's own limit (but under twice it) PIL only warns; the service refuses all the same."""
    from api.app import create_app

    assert Image.MAX_IMAGE_PIXELS is not None
    client = create_app(settings.with_overrides(max_image_pixels=10**10)).test_client()
    width = 10_000
    height = Image.MAX_IMAGE_PIXELS // width + 10
    r = upload(client, acme, _bomb_png(width, height))
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "image_too_large"
    assert "too many pixels" in r.get_json()["error"]["message"]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_an_image_past_the_aspect_ratio_is_refused_up_front(
    client: Any, acme: Tenant, settings: Any, fmt: str
) -> None:
    """Upload or inline: an image whose longer side is more than 200 times its shorter side is a 422 with
    its own code (the model would refuse it in the worker), and nothing is stored; 200:1 itself is taken."""
    storage = Storage.from_settings(settings)
    for size in ((4020, 20), (20, 4020)):
        data = png_bytes(*size, fmt=fmt)
        r = upload(client, acme, data)
        assert r.status_code == 422, r.get_json()
        assert r.get_json()["error"]["code"] == "image_aspect_ratio_too_large"
        inline = "data:image/png;base64," + base64.b64encode(data).decode()
        r = client.post(
            "/v1/jobs", json={"task": "edit", "instruction": "blue", "image": inline}, headers=acme.headers
        )
        assert r.status_code == 422, r.get_json()
        assert r.get_json()["error"]["code"] == "image_aspect_ratio_too_large"
    assert storage.list_keys(f"tenants/{acme.id}/") == []
    r = upload(client, acme, png_bytes(4000, 20, fmt=fmt))
    assert r.status_code == 201, r.get_json()
    inline = "data:image/png;base64," + base64.b64encode(png_bytes(20, 4000, fmt=fmt)).decode()
    r = client.post(
        "/v1/jobs", json={"task": "understand", "instruction": "what", "image": inline}, headers=acme.headers
    )
    assert r.status_code == 201, r.get_json()
