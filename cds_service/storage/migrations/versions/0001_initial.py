"""Initial schema: hook audit log, card/decision index, feedback, JWT replay store.

JSON documents are stored as UTF-8 bytes (see tables.JSONBytes).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "hook_audit",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("service_id", sa.String(100), nullable=False),
        sa.Column("hook", sa.String(50)),
        sa.Column("hook_instance", sa.String(200)),
        sa.Column("issuer", sa.String(500)),
        sa.Column("patient_id", sa.String(200)),
        sa.Column("status_code", sa.Integer, nullable=False),
        sa.Column("latency_ms", sa.Float, nullable=False),
        sa.Column("orders", sa.LargeBinary),
        sa.Column("decisions", sa.LargeBinary),
        sa.Column("response", sa.LargeBinary),
        sa.Column("request", sa.LargeBinary),
    )
    op.create_index("ix_hook_audit_received_at", "hook_audit", ["received_at"])
    op.create_index("ix_hook_audit_hook_instance", "hook_audit", ["hook_instance"])
    op.create_table(
        "card_decision",
        sa.Column("card_uuid", sa.String(64), primary_key=True),
        sa.Column("hook_instance", sa.String(200), nullable=False),
        sa.Column("coverage_assertion_id", sa.String(64), nullable=False),
        sa.Column("policy_id", sa.String(50), nullable=False),
        sa.Column("order_reference", sa.String(300), nullable=False),
        sa.Column("outcome", sa.String(30), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "feedback",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("service_id", sa.String(100), nullable=False),
        sa.Column("card_uuid", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("outcome_timestamp", sa.String(64), nullable=False),
        sa.Column("issuer", sa.String(500)),
        sa.Column("entry", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_feedback_card_uuid", "feedback", ["card_uuid"])
    op.create_table(
        "jwt_replay",
        sa.Column("issuer", sa.String(500), primary_key=True),
        sa.Column("jti", sa.String(500), primary_key=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_jwt_replay_expires_at", "jwt_replay", ["expires_at"])


def downgrade() -> None:
    op.drop_table("jwt_replay")
    op.drop_table("feedback")
    op.drop_table("card_decision")
    op.drop_table("hook_audit")
