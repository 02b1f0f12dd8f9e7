"""Queue rollups and delivery counters, so a peek, a top-up and a scrape read tens of rows at any depth.

- `queue_tenants` (queued jobs per task, priority and tenant) and `queue_buckets` (per task and bucket):
  rollups of the queued rows of `job_counts`, appended by statement triggers on `job_counts` itself, so
  they move in the same transaction as the job change and equal its sums by construction. The peek ranks
  up to 150 tenant keys instead of summing 3,000 group keys; a top-up reads 20 bucket keys.
- `ix_job_counts_tenant`: one tenant's groups at one priority, for the peek's few turns.
- `delivery_counts`: webhook deliveries per status, kept by statement triggers on `webhook_deliveries`, so
  `/metrics` never counts delivery rows.

Every table is append-only (one delta row per changed key and statement) and folded by the sweeper
(core.counts.compact_counts), as `job_counts` is. Existing rows are counted once here.

Revision ID: 0008_queue_rollups
Revises: 0007_job_events
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0008_queue_rollups"
down_revision: str | None = "0007_job_events"
branch_labels: str | None = None
depends_on: str | None = None

# table -> (its key columns, the SQL of its key over `rows`, the rows of the source table it counts)
_ROLLUPS = {
    "queue_tenants": ("task, priority, tenant_id", "task, priority, tenant_id", "status = 'queued'"),
    "queue_buckets": ("task, bucket", "task, bucket", "status = 'queued'"),
}


def _columns(*keys: sa.Column) -> list[sa.Column]:
    return [
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        *keys,
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    ]


def _delta_function(
    name: str, weight: str, targets: list[tuple[str, str, str, str]], skip: str = "false"
) -> str:
    """A statement trigger function appending, per target (table, key columns, key SQL, filter), one row
    per key whose count the statement changed: + `weight` (1: one per row) for new rows, - for old ones;
    nothing while `skip` holds."""

    def one(sign: str, rows: str, table: str, columns: str, key: str, where: str) -> str:
        return (
            f"INSERT INTO {table} ({columns}, n) SELECT {key}, {sign}sum({weight}) FROM {rows} "
            f"WHERE {where} GROUP BY {key};"
        )

    def changed(table: str, columns: str, key: str, where: str) -> str:
        return (
            f"INSERT INTO {table} ({columns}, n) SELECT {columns}, sum(d) FROM ("
            f"SELECT {key}, {weight} AS d FROM new_rows WHERE {where} UNION ALL "
            f"SELECT {key}, -{weight} AS d FROM old_rows WHERE {where}) AS c "
            f"GROUP BY {columns} HAVING sum(d) <> 0;"
        )

    added = "\n        ".join(one("", "new_rows", *target) for target in targets)
    removed = "\n        ".join(one("-", "old_rows", *target) for target in targets)
    updated = "\n        ".join(changed(*target) for target in targets)
    return f"""
CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF {skip} THEN
        RETURN NULL;
    ELSIF TG_OP = 'INSERT' THEN
        {added}
    ELSIF TG_OP = 'DELETE' THEN
        {removed}
    ELSE
        {updated}
    END IF;
    RETURN NULL;
END
$$
"""


def _triggers(table: str, prefix: str, function: str) -> None:
    for event, tables in (
        ("INSERT", "NEW TABLE AS new_rows"),
        ("UPDATE", "OLD TABLE AS old_rows NEW TABLE AS new_rows"),
        ("DELETE", "OLD TABLE AS old_rows"),
    ):
        op.execute(
            f"CREATE TRIGGER {prefix}_{event.lower()} AFTER {event} ON {table} REFERENCING {tables} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
        )


def upgrade() -> None:
    op.create_table(
        "queue_tenants",
        *_columns(
            sa.Column("task", sa.String(length=20), nullable=False),
            sa.Column("priority", sa.Integer(), nullable=False),
            sa.Column("tenant_id", sa.String(length=40), nullable=False),
        ),
    )
    op.create_index("ix_queue_tenants_key", "queue_tenants", ["task", "priority", "tenant_id"])
    op.create_table(
        "queue_buckets",
        *_columns(
            sa.Column("task", sa.String(length=20), nullable=False),
            sa.Column("bucket", sa.String(length=200), nullable=False),
        ),
    )
    op.create_index("ix_queue_buckets_key", "queue_buckets", ["task", "bucket"])
    op.create_table("delivery_counts", *_columns(sa.Column("status", sa.String(length=20), nullable=False)))
    op.create_index(
        "ix_job_counts_tenant",
        "job_counts",
        ["task", "tenant_id", "priority"],
        postgresql_where=sa.text("status = 'queued'"),
    )
    for table in ("queue_tenants", "queue_buckets", "delivery_counts"):  # folded every sweep, as job_counts
        op.execute(
            f"ALTER TABLE {table} SET"
            " (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000)"
        )
    # Count what is there, then keep counting (the locks keep a concurrent writer from slipping between).
    op.execute("LOCK TABLE job_counts, webhook_deliveries IN SHARE MODE")
    rollups = [(table, columns, key, where) for table, (columns, key, where) in _ROLLUPS.items()]
    for table, columns, key, where in rollups:
        op.execute(
            f"INSERT INTO {table} ({columns}, n) SELECT {key}, sum(n) FROM job_counts WHERE {where} "
            f"GROUP BY {key} HAVING sum(n) <> 0"
        )
    # A job_counts row carries a count (n), not one job: the rollups sum n. Folding job_counts (which keeps
    # every sum) says so in `nexusgen.folding`, and the rollups are left alone.
    folding = "coalesce(current_setting('nexusgen.folding', true), '') = 'on'"
    op.execute(_delta_function("nexusgen_roll_up_counts", "n", rollups, skip=folding))
    _triggers("job_counts", "job_counts_roll_up", "nexusgen_roll_up_counts")
    op.execute(
        "INSERT INTO delivery_counts (status, n)"
        " SELECT status, count(*) FROM webhook_deliveries GROUP BY status"
    )
    op.execute(
        _delta_function("nexusgen_count_deliveries", "1", [("delivery_counts", "status", "status", "true")])
    )
    _triggers("webhook_deliveries", "deliveries_count", "nexusgen_count_deliveries")


def downgrade() -> None:
    for table, prefix, function in (
        ("webhook_deliveries", "deliveries_count", "nexusgen_count_deliveries"),
        ("job_counts", "job_counts_roll_up", "nexusgen_roll_up_counts"),
    ):
        for event in ("insert", "update", "delete"):
            op.execute(f"DROP TRIGGER {prefix}_{event} ON {table}")
        op.execute(f"DROP FUNCTION {function}()")
    op.drop_index("ix_job_counts_tenant", table_name="job_counts")
    op.drop_table("delivery_counts")
    op.drop_index("ix_queue_buckets_key", table_name="queue_buckets")
    op.drop_table("queue_buckets")
    op.drop_index("ix_queue_tenants_key", table_name="queue_tenants")
    op.drop_table("queue_tenants")
