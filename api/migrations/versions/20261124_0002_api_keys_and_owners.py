"""api keys; jobs and files belong to the key that created them

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 05:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("rate_limit_per_minute", sa.Integer(), nullable=True),
        sa.Column("max_active_jobs", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    for table in ("jobs", "files"):
        op.add_column(table, sa.Column("owner_id", sa.String(length=32), nullable=True))
        op.create_index(op.f(f"ix_{table}_owner_id"), table, ["owner_id"])


def downgrade() -> None:
    for table in ("files", "jobs"):
        with op.batch_alter_table(table) as batch:  # SQLite rebuilds the table
            batch.drop_index(op.f(f"ix_{table}_owner_id"))
            batch.drop_column("owner_id")
    op.drop_table("api_keys")
