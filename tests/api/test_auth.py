"""Bearer keys and scopes: 401 without a valid key, 403 without the scope, admin may do everything."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, update

from api.auth import clear_cache
from core.auth import authenticate, create_api_key, create_tenant, hash_key
from core.schema import api_keys
from tests.api.conftest import Tenant


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer ngk_wrong"},
        {"Authorization": "Basic eDp5"},
    ],
)
def test_missing_or_wrong_key_is_401(client: Any, acme: Tenant, headers: dict[str, str]) -> None:
    for method, path in [
        ("get", "/v1/jobs"),
        ("post", "/v1/jobs"),
        ("post", "/v1/batches"),
        ("post", "/v1/uploads"),
    ]:
        r = getattr(client, method)(path, headers=headers)
        assert r.status_code == 401 and r.get_json()["error"]["code"] == "unauthorized", path


def test_scopes(client: Any, make_tenant: Any) -> None:
    reader = make_tenant("reader", ("read",))
    writer = make_tenant("writer", ("submit",))
    admin = make_tenant("boss", ("admin",))
    job = {"task": "generate", "prompt": "x"}
    r = client.post("/v1/jobs", json=job, headers=reader.headers)
    assert r.status_code == 403 and r.get_json()["error"]["code"] == "forbidden"
    created = client.post("/v1/jobs", json=job, headers=writer.headers)
    assert created.status_code == 201
    r = client.get(f"/v1/jobs/{created.get_json()['id']}", headers=writer.headers)
    assert r.status_code == 403 and r.get_json()["error"]["code"] == "forbidden"
    assert client.get("/v1/jobs", headers=reader.headers).status_code == 200
    assert client.post("/v1/jobs", json=job, headers=admin.headers).status_code == 201
    assert client.get("/v1/jobs", headers=admin.headers).status_code == 200


def test_keys_are_stored_hashed_and_revocable(client: Any, engine: Any, clean_db: Any) -> None:
    with engine.begin() as conn:
        create_tenant(conn, "acme")
        key = create_api_key(conn, "acme")
        stored = conn.execute(api_keys.select()).mappings().one()
    assert stored["key_hash"] == hash_key(key) and key not in stored.values()
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    with engine.begin() as conn:
        conn.execute(update(api_keys).values(revoked_at=func.now()))
        assert authenticate(conn, key) is None
    clear_cache()
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 401


def test_cli_functions_refuse_bad_input(engine: Any, clean_db: Any) -> None:
    with engine.begin() as conn:
        tenant_id, secret = create_tenant(conn, "acme")
        assert tenant_id.startswith("ten_") and secret.startswith("whsec_")
        with pytest.raises(ValueError, match="already exists"):
            create_tenant(conn, "acme")
        with pytest.raises(ValueError, match="no tenant"):
            create_api_key(conn, "nobody")
        with pytest.raises(ValueError, match="scopes"):
            create_api_key(conn, "acme", scopes=("write",))
