"""Alembic: upgrade an empty database to head, match core.schema exactly, downgrade to nothing, again."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, func, inspect, make_url, select, text

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
        deliveries = {ix["name"] for ix in inspect(conn).get_indexes("webhook_deliveries")}
        assert {"ix_webhook_deliveries_pending", "ix_webhook_deliveries_leased"} <= deliveries
        assert "ix_webhook_deliveries_due" not in deliveries  # 0010: claims read the partial ones
        triggers = conn.execute(
            text("SELECT tgname FROM pg_trigger WHERE tgrelid = 'jobs'::regclass AND NOT tgisinternal")
        ).scalars()
        assert sorted(triggers) == [
            "jobs_count_delete",
            "jobs_count_insert",
            "jobs_count_update",
            "jobs_references",
            "jobs_references_fixed",
        ]
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
        for function in (
            "nexusgen_count_jobs",
            "nexusgen_roll_up_counts",
            "nexusgen_count_deliveries",
            "nexusgen_check_job_references",
            "nexusgen_delete_jobs_of",
        ):
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


def test_job_references_hold_as_foreign_keys_did(clean_db: Any) -> None:
    """0009: tenant and batch checked once per statement; updates refused; deletes cascade."""
    from psycopg.errors import ForeignKeyViolation
    from sqlalchemy.exc import IntegrityError

    from core.ingest import insert_jobs
    from core.schema import batches, jobs, tenants
    from core.submit import JobDraft

    draft = JobDraft(task="understand", prompt="x", params={}, bucket="understand|16")
    with clean_db.begin() as conn:
        for tenant in ("ten_a", "ten_b"):
            conn.execute(tenants.insert().values(id=tenant, name=tenant, webhook_secret="whsec_x"))
        conn.execute(batches.insert().values(id="bat_a", tenant_id="ten_a", total_jobs=3))
        insert_jobs(conn, "ten_a", "bat_a", [draft] * 3)
        insert_jobs(conn, "ten_a", None, [draft] * 2)
        insert_jobs(conn, "ten_b", None, [draft])
    for tenant, batch, table in (("ten_gone", None, "tenants"), ("ten_a", "bat_gone", "batches")):
        with pytest.raises(ForeignKeyViolation, match=f'reference to "{table}"'), clean_db.begin() as conn:
            insert_jobs(conn, tenant, batch, [draft])  # COPY: psycopg's error, as a foreign key's was
    with pytest.raises(IntegrityError, match="do not change"), clean_db.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.tenant_id == "ten_b").values(tenant_id="ten_a"))

    def count(**where: str | None) -> int:
        with clean_db.connect() as conn:
            q = select(func.count()).select_from(jobs)
            for column, value in where.items():
                q = q.where(jobs.c[column] == value)
            return int(conn.execute(q).scalar_one())

    assert (count(tenant_id="ten_a"), count(tenant_id="ten_b")) == (5, 1)
    with clean_db.begin() as conn:
        conn.execute(batches.delete().where(batches.c.id == "bat_a"))
    assert (count(tenant_id="ten_a"), count(batch_id="bat_a")) == (2, 0)
    with clean_db.begin() as conn:
        conn.execute(tenants.delete().where(tenants.c.id == "ten_a"))
    assert (count(tenant_id="ten_a"), count(tenant_id="ten_b")) == (0, 1)
