"""Embedded Postgres, Redis and S3 for the service benches: the servers `nexusgen up` and the tests use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.settings import Settings


def start_services(root: Path, **overrides: Any) -> tuple[Settings, list[Any]]:
    """Start the three servers under `root`, migrate and make the bucket; return settings and servers."""
    from core.migrate import upgrade
    from core.storage import Storage
    from nexusgen import embedded

    pg = embedded.start_postgres(root / "pg", embedded.free_port(), root / "pg.log")
    redis = embedded.start_redis(root / "redis", embedded.free_port(), root / "redis.log")
    access, secret = embedded.s3_credentials(root)
    s3 = embedded.start_s3(root / "s3", embedded.free_port(), root / "s3.log", access, secret)
    settings = Settings(
        database_url=pg.url,
        broker_url=redis.url,
        s3_endpoint_url=s3.url,
        s3_access_key=access,
        s3_secret_key=secret,
        s3_bucket="bench",
        state_dir=root / "state",
        **overrides,
    )
    upgrade(settings)
    Storage.from_settings(settings).ensure_bucket()
    return settings, [s3, redis, pg]
