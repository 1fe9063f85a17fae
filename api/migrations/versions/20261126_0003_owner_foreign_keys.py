"""jobs and files name their owner by foreign key

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 09:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("jobs", "files")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:  # SQLite rebuilds the table
            batch.create_foreign_key(
                op.f(f"fk_{table}_owner_id_api_keys"), "api_keys", ["owner_id"], ["id"]
            )


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(op.f(f"fk_{table}_owner_id_api_keys"), type_="foreignkey")
