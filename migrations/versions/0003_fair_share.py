"""Fair share and a queue that stays fast at depth: partial indexes, job counters, tenant turns.

- `ix_jobs_claim` (every row, whatever its status) becomes `ix_jobs_queue`, partial on queued jobs and
  ordered like a claim within one (task, bucket, priority, tenant) group; `ix_jobs_queued_since` finds
  the longest-waiting queued jobs per task; `ix_jobs_lease` holds running jobs only; `ix_jobs_finished`
  feeds the recent-jobs histograms.
- `job_counts`: statement-level triggers on `jobs` append one row per changed key and statement (jobs
  by tenant, task and status; bucket and priority for queued jobs), so /metrics and the scheduler never
  count job rows, and no transition waits on a shared counter row. Existing jobs are counted once here.
- `tenant_turns`: when each tenant was last served, for round robin between tenants.

Revision ID: 0003_fair_share
Revises: 0002_job_loss_accounting
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003_fair_share"
down_revision: str | None = "0002_job_loss_accounting"
branch_labels: str | None = None
depends_on: str | None = None

QUEUED = sa.text("status = 'queued'")

# One key per counted row: bucket and priority only matter while a job waits.
_KEY = (
    "tenant_id, task, status, CASE WHEN status = 'queued' THEN bucket ELSE '' END AS bucket, "
    "CASE WHEN status = 'queued' THEN priority ELSE 0 END AS priority"
)
_COUNT = f"""
CREATE FUNCTION nexusgen_count_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO job_counts (tenant_id, task, status, bucket, priority, n)
        SELECT tenant_id, task, status, bucket, priority, count(*)
        FROM (SELECT {_KEY} FROM new_rows) AS added
        GROUP BY 1, 2, 3, 4, 5;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO job_counts (tenant_id, task, status, bucket, priority, n)
        SELECT tenant_id, task, status, bucket, priority, -count(*)
        FROM (SELECT {_KEY} FROM old_rows) AS removed
        GROUP BY 1, 2, 3, 4, 5;
    ELSE
        INSERT INTO job_counts (tenant_id, task, status, bucket, priority, n)
        SELECT tenant_id, task, status, bucket, priority, sum(d)
        FROM (
            SELECT {_KEY}, 1 AS d FROM new_rows
            UNION ALL
            SELECT {_KEY}, -1 AS d FROM old_rows
        ) AS changed
        GROUP BY 1, 2, 3, 4, 5
        HAVING sum(d) <> 0;
    END IF;
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    op.drop_index("ix_jobs_claim", table_name="jobs")
    op.drop_index("ix_jobs_lease", table_name="jobs")
    op.create_index(
        "ix_jobs_queue",
        "jobs",
        ["task", "bucket", sa.literal_column("priority DESC"), "tenant_id", "created_at", "id"],
        postgresql_where=QUEUED,
    )
    op.create_index("ix_jobs_queued_since", "jobs", ["task", "enqueued_at"], postgresql_where=QUEUED)
    op.create_index(
        "ix_jobs_lease", "jobs", ["lease_expires_at"], postgresql_where=sa.text("status = 'running'")
    )
    op.create_index(
        "ix_jobs_finished", "jobs", ["finished_at"], postgresql_where=sa.text("finished_at IS NOT NULL")
    )
    op.create_table(
        "job_counts",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("task", sa.String(length=20), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("bucket", sa.String(length=200), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_job_counts_key", "job_counts", ["status", "task", "bucket"])
    # Each sweep folds the delta rows (delete and insert): vacuum the small table after every 1,000 dead
    # rows, not after 20% of it, so reads of the counters do not wade through dead versions.
    op.execute(
        "ALTER TABLE job_counts SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000)"
    )
    op.create_table(
        "tenant_turns",
        sa.Column("task", sa.String(length=20), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("served_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("task", "tenant_id"),
    )
    # Count what is there, then keep counting (the lock keeps a concurrent writer from slipping between).
    op.execute("LOCK TABLE jobs IN SHARE MODE")
    op.execute(
        "INSERT INTO job_counts (tenant_id, task, status, bucket, priority, n) "
        f"SELECT tenant_id, task, status, bucket, priority, count(*) FROM (SELECT {_KEY} FROM jobs) AS j "
        "GROUP BY 1, 2, 3, 4, 5"
    )
    op.execute(_COUNT)
    for event, tables in (
        ("INSERT", "NEW TABLE AS new_rows"),
        ("UPDATE", "OLD TABLE AS old_rows NEW TABLE AS new_rows"),
        ("DELETE", "OLD TABLE AS old_rows"),
    ):
        op.execute(
            f"CREATE TRIGGER jobs_count_{event.lower()} AFTER {event} ON jobs REFERENCING {tables} "
            "FOR EACH STATEMENT EXECUTE FUNCTION nexusgen_count_jobs()"
        )


def downgrade() -> None:
    for event in ("insert", "update", "delete"):
        op.execute(f"DROP TRIGGER jobs_count_{event} ON jobs")
    op.execute("DROP FUNCTION nexusgen_count_jobs()")
    op.drop_table("tenant_turns")
    op.drop_index("ix_job_counts_key", table_name="job_counts")
    op.drop_table("job_counts")
    op.drop_index("ix_jobs_finished", table_name="jobs")
    op.drop_index("ix_jobs_lease", table_name="jobs")
    op.drop_index("ix_jobs_queued_since", table_name="jobs")
    op.drop_index("ix_jobs_queue", table_name="jobs")
    op.create_index("ix_jobs_lease", "jobs", ["status", "lease_expires_at"])
    op.create_index(
        "ix_jobs_claim",
        "jobs",
        ["status", "task", "bucket", sa.literal_column("priority DESC"), "created_at"],
    )
