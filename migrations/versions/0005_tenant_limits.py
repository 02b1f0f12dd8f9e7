"""Per-tenant limits: queued jobs, submissions a minute (with the rate limiter's state), running jobs.

Revision ID: 0005_tenant_limits
Revises: 0004_retention
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005_tenant_limits"
down_revision: str | None = "0004_retention"
branch_labels: str | None = None
depends_on: str | None = None

LIMITS = ("max_queued", "submit_per_minute", "max_running")


def upgrade() -> None:
    for name in LIMITS:
        op.add_column("tenants", sa.Column(name, sa.Integer(), nullable=True))
    op.add_column("tenants", sa.Column("submit_tat", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("tenants", "submit_tat")
    for name in reversed(LIMITS):
        op.drop_column("tenants", name)
