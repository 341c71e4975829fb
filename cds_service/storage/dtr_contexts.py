"""What a DTR ``$questionnaire-package`` request needs of a coverage decision, kept by its
coverage-assertion-id (the CRD ``context``): the policy and form, the patient and order, what was missing, the
sections to show and the chart searches its pre-filled answers are computed from.

Rows ride the audit record of the hook call (:attr:`AuditRecord.dtr_contexts`): the writer stores them with
it, off the request path and durably (the spool keeps them while the database is away), so every replica
finds them and they survive restarts. A row expires with its assertion (:data:`CONTEXT_DAYS` after the
decision); lookups ignore expired rows and writes delete them now and then.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from .tables import JSONBytes, insert_new, metadata, storable

#: how long a coverage assertion's documentation context is kept
CONTEXT_DAYS = 30

dtr_context = sa.Table(
    "dtr_context",
    metadata,
    sa.Column("coverage_assertion_id", sa.String(64), primary_key=True),
    sa.Column("policy_id", sa.String(50), nullable=False),
    sa.Column("form_id", sa.String(64), nullable=False),
    sa.Column("patient_id", sa.String(200)),
    sa.Column("order_reference", sa.String(300), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("context", JSONBytes, nullable=False),
)


def context_row(assertion_id: str, policy_id: str, form_id: str, patient_id: str | None, order_reference: str,
                context: Mapping[str, Any], now: dt.datetime | None = None) -> dict[str, Any]:
    """A row for :attr:`AuditRecord.dtr_contexts` (times as ISO text, so that the spool keeps it as JSON)."""
    created = now or dt.datetime.now(dt.UTC)
    return {"coverage_assertion_id": assertion_id, "policy_id": policy_id, "form_id": form_id,
            "patient_id": patient_id, "order_reference": order_reference, "created_at": created.isoformat(),
            "expires_at": (created + dt.timedelta(days=CONTEXT_DAYS)).isoformat(), "context": dict(context)}


def _time(value: Any) -> dt.datetime:
    moment = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    assert isinstance(moment, dt.datetime)
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def insert_contexts(connection: sa.Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Store rows (one already stored is kept as it is), within the audit writer's transaction."""
    values = [storable(dtr_context, {**row, "created_at": _time(row["created_at"]),
                                     "expires_at": _time(row["expires_at"])}) for row in rows]
    connection.execute(insert_new(connection, dtr_context, "coverage_assertion_id"), values)
    connection.execute(dtr_context.delete().where(dtr_context.c.expires_at < dt.datetime.now(dt.UTC)))


def find_context(engine: sa.Engine, assertion_id: str) -> dict[str, Any] | None:
    """The unexpired context of a coverage assertion, or None."""
    query = sa.select(dtr_context).where(dtr_context.c.coverage_assertion_id == assertion_id,
                                         dtr_context.c.expires_at >= dt.datetime.now(dt.UTC))
    with engine.connect() as connection:
        row = connection.execute(query).first()
    return None if row is None else {str(k): v for k, v in row._mapping.items()}
