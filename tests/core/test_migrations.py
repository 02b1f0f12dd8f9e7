"""Alembic: upgrade an empty database to head, match core.schema exactly, downgrade to nothing, again."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, make_url, text

from core.migrate import current_revision, downgrade, head_revision, schema_diff, upgrade
from core.schema import metadata


@pytest.fixture
def empty_db(pg_url: str, settings: Any) -> Iterator[Any]:
    """A brand-new database on the test server, dropped afterwards."""
    name = f"migrations_{os.urandom(4).hex()}"
    admin = create_engine(make_url(pg_url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    engine = create_engine(url)
    try:
        yield settings.with_overrides(database_url=url), engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_upgrade_matches_metadata_and_downgrade_is_clean(empty_db: Any) -> None:
    settings, engine = empty_db
    with engine.connect() as conn:
        assert current_revision(conn) is None
        assert inspect(conn).get_table_names() == []

    upgrade(settings)
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()
        assert set(inspect(conn).get_table_names()) == set(metadata.tables) | {"alembic_version"}
        assert schema_diff(conn) == []
        indexes = {ix["name"] for ix in inspect(conn).get_indexes("jobs")}
        assert {"ix_jobs_queue", "ix_jobs_queued_since", "ix_jobs_tenant_created", "ix_jobs_lease"} <= indexes
        assert "ix_jobs_claim" not in indexes  # replaced by the partial ix_jobs_queue
        triggers = conn.execute(
            text("SELECT tgname FROM pg_trigger WHERE tgrelid = 'jobs'::regclass AND NOT tgisinternal")
        ).scalars()
        assert sorted(triggers) == ["jobs_count_delete", "jobs_count_insert", "jobs_count_update"]
        rollups = conn.execute(
            text(
                "SELECT tgrelid::regclass::text, tgname FROM pg_trigger WHERE NOT tgisinternal"
                " AND tgrelid IN ('job_counts'::regclass, 'webhook_deliveries'::regclass) ORDER BY 1, 2"
            )
        ).all()
        assert [tuple(r) for r in rollups] == [
            ("job_counts", f"job_counts_roll_up_{event}") for event in ("delete", "insert", "update")
        ] + [("webhook_deliveries", f"deliveries_count_{event}") for event in ("delete", "insert", "update")]

    upgrade(settings)  # a second run is a no-op
    downgrade(settings, "base")
    with engine.connect() as conn:
        assert current_revision(conn) is None
        assert inspect(conn).get_table_names() == ["alembic_version"]  # only Alembic's own bookkeeping
        assert conn.execute(text("SELECT count(*) FROM pg_type WHERE typtype = 'e'")).scalar() == 0
        for function in ("nexusgen_count_jobs", "nexusgen_roll_up_counts", "nexusgen_count_deliveries"):
            assert conn.execute(text("SELECT to_regproc(:f)"), {"f": function}).scalar() is None

    upgrade(settings)  # and back up again from empty
    with engine.connect() as conn:
        assert schema_diff(conn) == []


def test_the_session_database_is_at_head(engine: Any) -> None:
    with engine.connect() as conn:
        assert current_revision(conn) == head_revision()
        assert schema_diff(conn) == []


def test_fair_share_revision_counts_the_jobs_already_there(empty_db: Any) -> None:
    settings, engine = empty_db
    upgrade(settings, "0002_job_loss_accounting")  # the revision before the counters
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (id, name, webhook_secret) VALUES ('ten_a', 'a', 'whsec_x')"))
        for i, (status, priority) in enumerate([("queued", 0)] * 3 + [("queued", 2), ("succeeded", 0)]):
            conn.execute(
                text(
                    "INSERT INTO jobs (id, tenant_id, task, prompt, params, bucket, status, priority)"
                    " VALUES (:id, 'ten_a', 'generate', 'x', '{}', 'b', :status, :priority)"
                ),
                {"id": f"job_{i}", "status": status, "priority": priority},
            )
    upgrade(settings)
    with engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET status = 'running' WHERE id = 'job_0'"))  # counted from now on
        counted = conn.execute(
            text(
                "SELECT status, priority, sum(n) FROM job_counts GROUP BY status, priority"
                " HAVING sum(n) <> 0 ORDER BY 1, 2"
            )
        ).all()
    assert [tuple(r) for r in counted] == [
        ("queued", 0, 2),
        ("queued", 2, 1),
        ("running", 0, 1),
        ("succeeded", 0, 1),
    ]
