"""DTR documentation contexts: what a $questionnaire-package request needs of a coverage decision, by its
coverage-assertion-id (see cds_service/storage/dtr_contexts.py).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dtr_context",
        sa.Column("coverage_assertion_id", sa.String(64), primary_key=True),
        sa.Column("policy_id", sa.String(50), nullable=False),
        sa.Column("form_id", sa.String(64), nullable=False),
        sa.Column("patient_id", sa.String(200)),
        sa.Column("order_reference", sa.String(300), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("context", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_dtr_context_expires_at", "dtr_context", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_dtr_context_expires_at", "dtr_context")
    op.drop_table("dtr_context")
