"""A queued job's position at the same cost at any depth: `ix_jobs_queue_tenant`.

GET /v1/jobs/{id} and the event streams counted every queued job of the task ahead of a queued job
(up to 100,000 rows per read: 2.4 ms of Postgres CPU at 10k queued, tens to hundreds at 1M). The position
now counts only the job's own tenant's jobs of its task and priority ahead of it, up to 1,000, and takes
the rest from the queue rollups (core.events.position_sql, docs/queue_position.md): this index holds
those jobs as one range, (task, tenant_id, priority, created_at, id) on queued jobs.

Revision ID: 0011_queue_position
Revises: 0010_delivery_claims
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0011_queue_position"
down_revision: str | None = "0010_delivery_claims"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_index(
        "ix_jobs_queue_tenant",
        "jobs",
        ["task", "tenant_id", "priority", "created_at", "id"],
        postgresql_where=sa.text("status = 'queued'"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_queue_tenant", table_name="jobs")
