"""the OpenAI fine-tuning view: a job's suffix and metadata; files with a purpose, a job's
results file, rows and columns unknown for those

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("suffix", sa.String(length=64), nullable=True))
    op.add_column("jobs", sa.Column("user_metadata", sa.JSON(), nullable=True))
    with op.batch_alter_table("files") as batch:  # SQLite rebuilds the table
        batch.add_column(
            sa.Column("purpose", sa.String(length=32), nullable=False, server_default="fine-tune")
        )
        batch.add_column(sa.Column("job_id", sa.String(length=32), nullable=True))
        batch.create_index(op.f("ix_files_job_id"), ["job_id"])
        batch.create_index("ix_files_created_at_id", ["created_at", "id"])
        batch.alter_column("rows", existing_type=sa.Integer(), nullable=True)
        batch.alter_column("columns", existing_type=sa.JSON(), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM files WHERE job_id IS NOT NULL")
    with op.batch_alter_table("files") as batch:
        batch.alter_column("columns", existing_type=sa.JSON(), nullable=False)
        batch.alter_column("rows", existing_type=sa.Integer(), nullable=False)
        batch.drop_index("ix_files_created_at_id")
        batch.drop_index(op.f("ix_files_job_id"))
        batch.drop_column("job_id")
        batch.drop_column("purpose")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("user_metadata")
        batch.drop_column("suffix")
