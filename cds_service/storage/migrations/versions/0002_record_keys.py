"""Record keys: every audit and feedback record carries a unique key, so that writing it again (a replay
of the spool after a write whose outcome was unknown) stores it once. Rows written before have the key
``legacy-<id>``.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_TABLES = ("hook_audit", "feedback")


def upgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("record_key", sa.String(40), nullable=True))
        op.execute(f"UPDATE {table} SET record_key = 'legacy-' || CAST(id AS VARCHAR(20))")
        with op.batch_alter_table(table) as batch:
            batch.alter_column("record_key", existing_type=sa.String(40), nullable=False)
            batch.create_index(f"uq_{table}_record_key", ["record_key"], unique=True)


def downgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"uq_{table}_record_key")
            batch.drop_column("record_key")
