"""The Da Vinci CRD version each answer followed (hook_audit.crd_version; NULL for calls not answered with
a decision, and for rows written before).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("hook_audit") as batch:
        batch.add_column(sa.Column("crd_version", sa.String(16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("hook_audit") as batch:
        batch.drop_column("crd_version")
