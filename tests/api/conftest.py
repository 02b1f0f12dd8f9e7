"""Fixtures for API tests: the app from create_app(settings), tenants with keys, small images."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from flask.testing import FlaskClient
from PIL import Image

from core.auth import create_api_key, create_tenant


@dataclass
class Tenant:
    id: str
    name: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture
def app(settings: Any, engine: Any, clean_db: Any) -> Any:
    from api.app import create_app

    app = create_app(settings)
    app.config["TESTING"] = True
    return app


@pytest.fixture
def client(app: Any) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def make_tenant(engine: Any) -> Callable[..., Tenant]:
    def make(name: str, scopes: tuple[str, ...] = ("submit", "read")) -> Tenant:
        with engine.begin() as conn:
            tenant_id, _ = create_tenant(conn, name)
            key = create_api_key(conn, name, scopes)
        return Tenant(tenant_id, name, key)

    return make


@pytest.fixture
def acme(make_tenant: Callable[..., Tenant]) -> Tenant:
    return make_tenant("acme")


@pytest.fixture
def globex(make_tenant: Callable[..., Tenant]) -> Tenant:
    return make_tenant("globex")


def png_bytes(width: int = 64, height: int = 48, fmt: str = "PNG", color: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, fmt)
    return buf.getvalue()


def upload(client: FlaskClient, tenant: Tenant, data: bytes | None = None, **headers: str) -> Any:
    return client.post(
        "/v1/uploads",
        data={"file": (io.BytesIO(data if data is not None else png_bytes()), "image.png")},
        headers={**tenant.headers, **headers},
        content_type="multipart/form-data",
    )
