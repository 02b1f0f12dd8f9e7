"""Result retention: per-tenant TTL override, expiry columns on results and uploads.

Rows from before this revision are kept for the default 7 days from their creation.

Revision ID: 0004_retention
Revises: 0003_fair_share
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004_retention"
down_revision: str | None = "0003_fair_share"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("result_ttl_s", sa.Integer(), nullable=True))
    for table in ("results", "uploads"):
        op.add_column(table, sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        op.add_column(table, sa.Column("expired_at", sa.DateTime(timezone=True), nullable=True))
        op.execute(f"UPDATE {table} SET expires_at = created_at + interval '7 days'")
        op.create_index(
            f"ix_{table}_expiry", table, ["expires_at"], postgresql_where=sa.text("expired_at IS NULL")
        )
        op.create_index(
            f"ix_{table}_purge",
            table,
            ["expired_at"],
            postgresql_where=sa.text("expired_at IS NOT NULL AND object_key IS NOT NULL"),
        )
    op.alter_column("uploads", "object_key", existing_type=sa.Text(), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM uploads WHERE object_key IS NULL")
    op.alter_column("uploads", "object_key", existing_type=sa.Text(), nullable=False)
    for table in ("results", "uploads"):
        op.drop_index(f"ix_{table}_purge", table_name=table)
        op.drop_index(f"ix_{table}_expiry", table_name=table)
        op.drop_column(table, "expired_at")
        op.drop_column(table, "expires_at")
    op.drop_column("tenants", "result_ttl_s")
