"""Fixtures for API tests: the app from create_app(settings), tenants with keys (tests/support/api.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask.testing import FlaskClient

from tests.support.api import Tenant, new_tenant, png_bytes, upload

__all__ = ["Tenant", "png_bytes", "upload"]  # for the API tests that import them from here


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
        return new_tenant(engine, name, scopes)

    return make


@pytest.fixture
def acme(make_tenant: Callable[..., Tenant]) -> Tenant:
    return make_tenant("acme")


@pytest.fixture
def globex(make_tenant: Callable[..., Tenant]) -> Tenant:
    return make_tenant("globex")
