"""Separate accounting of worker losses and transient put-backs on jobs (only losses count as poison).

Existing jobs start at zero for both: which of their earlier claims were losses is not recorded.

Revision ID: 0002_job_loss_accounting
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002_job_loss_accounting"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column(
        "jobs", sa.Column("worker_losses", sa.Integer(), server_default=sa.text("0"), nullable=False)
    )
    op.add_column("jobs", sa.Column("put_backs", sa.Integer(), server_default=sa.text("0"), nullable=False))


def downgrade() -> None:
    op.drop_column("jobs", "put_backs")
    op.drop_column("jobs", "worker_losses")
