"""Helpers for tests that talk to the API: tenants with keys, small images and uploads, and the API
served over real HTTP on a loopback port."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import Engine

from core.auth import create_api_key, create_tenant
from nexusgen.client import Client


@dataclass
class Tenant:
    id: str
    name: str
    key: str
    secret: str = ""  # the tenant's webhook signing secret

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def new_tenant(engine: Engine, name: str, scopes: tuple[str, ...] = ("submit", "read")) -> Tenant:
    """A tenant named `name` with one API key of `scopes`."""
    with engine.begin() as conn:
        tenant_id, secret = create_tenant(conn, name)
        key = create_api_key(conn, name, scopes)
    return Tenant(tenant_id, name, key, secret)


def png_bytes(width: int = 64, height: int = 48, fmt: str = "PNG", color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, fmt)
    return buf.getvalue()


def upload(client: FlaskClient, tenant: Tenant, data: bytes | None = None, **headers: str) -> Any:
    """POST /v1/uploads of `data` (a small PNG by default); returns the response."""
    return client.post(
        "/v1/uploads",
        data={"file": (io.BytesIO(data if data is not None else png_bytes()), "image.png")},
        headers={**tenant.headers, **headers},
        content_type="multipart/form-data",
    )


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """The app on a loopback port (threaded, one thread per connection, quiet); yields its base URL."""
    from werkzeug.serving import WSGIRequestHandler, make_server

    class Quiet(WSGIRequestHandler):
        def log_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    http = make_server("127.0.0.1", 0, app, threaded=True, request_handler=Quiet)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{http.server_port}"
    finally:
        http.shutdown()
        thread.join()


def http_client(engine: Engine, url: str, name: str) -> Client:
    """nexusgen's HTTP client for the API at `url`, with the key of a new tenant `name`."""
    return Client(url, new_tenant(engine, name).key)
