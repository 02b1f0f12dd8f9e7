"""Tenants and API keys: keys are shown once and stored as sha256 hashes; scopes submit, read, admin."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, select
from sqlalchemy.exc import IntegrityError

from core.ids import new_id
from core.schema import api_keys, tenants
from core.webhooks import new_secret

SCOPES = ("submit", "read", "admin")
KEY_PREFIX = "ngk_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant an API key belongs to and what the key may do."""

    tenant_id: str
    key_id: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        """admin implies every other scope."""
        return scope in self.scopes or "admin" in self.scopes


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_tenant(conn: Connection, name: str) -> tuple[str, str]:
    """Create a tenant; return (tenant id, webhook signing secret). Raise ValueError if the name is taken."""
    name = name.strip()
    if not name or len(name) > 200:
        raise ValueError("a tenant name must have 1 to 200 characters")
    tenant_id, secret = new_id("ten"), new_secret()
    try:
        with conn.begin_nested():
            conn.execute(tenants.insert().values(id=tenant_id, name=name, webhook_secret=secret))
    except IntegrityError as exc:
        raise ValueError(f"a tenant named {name!r} already exists") from exc
    return tenant_id, secret


def tenant_id_by_name(conn: Connection, name: str) -> str:
    row = conn.execute(select(tenants.c.id).where(tenants.c.name == name)).first()
    if row is None:
        raise ValueError(f"no tenant named {name!r}")
    return str(row.id)


def create_api_key(conn: Connection, tenant_name: str, scopes: Iterable[str] = ("submit", "read")) -> str:
    """Create a key for the tenant and return it; it cannot be shown again (only its hash is kept)."""
    scope_list = sorted(set(scopes))
    unknown = [s for s in scope_list if s not in SCOPES]
    if unknown or not scope_list:
        raise ValueError(f"scopes must be a non-empty subset of {list(SCOPES)}, got {scope_list}")
    tenant_id = tenant_id_by_name(conn, tenant_name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    conn.execute(
        api_keys.insert().values(
            id=new_id("key"), tenant_id=tenant_id, key_hash=hash_key(key), prefix=key[:12], scopes=scope_list
        )
    )
    return key


def authenticate(conn: Connection, key: str) -> Principal | None:
    """The principal for a presented key, or None for an unknown or revoked key."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    row = conn.execute(
        select(api_keys.c.id, api_keys.c.tenant_id, api_keys.c.scopes).where(
            api_keys.c.key_hash == hash_key(key), api_keys.c.revoked_at.is_(None)
        )
    ).first()
    if row is None:
        return None
    return Principal(tenant_id=row.tenant_id, key_id=row.id, scopes=frozenset(row.scopes))
