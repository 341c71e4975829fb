"""The database schema (SQLAlchemy Core). Changes go through a new Alembic migration in
``migrations/versions``; this module describes the current head."""

from __future__ import annotations

import zlib
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

COMPRESS_OVER = 2048
_ZLIB_HEADER = 0x78  # every zlib stream starts with it; JSON text never does


class JSONBytes(sa.types.TypeDecorator[Any]):
    """JSON kept as bytes (BLOB / bytea): UTF-8, zlib-compressed (level 1) when over 2 KiB. Values may
    arrive already serialised (bytes), as the audit path does to keep its queue compact; anything else
    is serialised with orjson. Compression runs in the writing thread and releases the GIL, so a large
    hook request (hundreds of KB of prefetch) costs the request path nothing and the disk a tenth."""

    impl = sa.LargeBinary
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> bytes | None:
        if value is None:
            return None
        data = bytes(value) if isinstance(value, bytes | bytearray) else orjson.dumps(value)
        return zlib.compress(data, 1) if len(data) > COMPRESS_OVER else data

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        data = bytes(value)
        if data[:1] == bytes([_ZLIB_HEADER]):
            data = zlib.decompress(data)
        return orjson.loads(data)


metadata = sa.MetaData()

hook_audit = sa.Table(
    "hook_audit",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("service_id", sa.String(100), nullable=False),
    sa.Column("hook", sa.String(50)),
    sa.Column("hook_instance", sa.String(200), index=True),
    sa.Column("issuer", sa.String(500)),
    sa.Column("patient_id", sa.String(200)),
    sa.Column("status_code", sa.Integer, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("orders", JSONBytes),
    sa.Column("decisions", JSONBytes),
    sa.Column("response", JSONBytes),
    sa.Column("request", JSONBytes),
    sa.Column("record_key", sa.String(40), nullable=False),
    sa.Column("crd_version", sa.String(16)),
    sa.Index("uq_hook_audit_record_key", "record_key", unique=True),
)

card_decision = sa.Table(
    "card_decision",
    metadata,
    sa.Column("card_uuid", sa.String(64), primary_key=True),
    sa.Column("hook_instance", sa.String(200), nullable=False),
    sa.Column("coverage_assertion_id", sa.String(64), nullable=False),
    sa.Column("policy_id", sa.String(50), nullable=False),
    sa.Column("order_reference", sa.String(300), nullable=False),
    sa.Column("outcome", sa.String(30), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("service_id", sa.String(100), nullable=False),
    sa.Column("card_uuid", sa.String(64), nullable=False, index=True),
    sa.Column("outcome", sa.String(20), nullable=False),
    sa.Column("outcome_timestamp", sa.String(64), nullable=False),
    sa.Column("issuer", sa.String(500)),
    sa.Column("entry", JSONBytes, nullable=False),
    sa.Column("record_key", sa.String(40), nullable=False),
    sa.Index("uq_feedback_record_key", "record_key", unique=True),
)

jwt_replay = sa.Table(
    "jwt_replay",
    metadata,
    sa.Column("issuer", sa.String(500), primary_key=True),
    sa.Column("jti", sa.String(500), primary_key=True),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False, index=True),
)


def storable(table: sa.Table, row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with every text value made storable in its column: NUL characters (which PostgreSQL
    refuses) replaced by U+FFFD, and a value longer than its column cut to the column's length. The
    edge refuses such values on calls it answers (hooks/request.py, hooks/feedback.py); a refused call's
    record may hold them, and its request document keeps them as sent."""
    out = dict(row)
    for name, value in row.items():
        if isinstance(value, str):
            length = getattr(table.c[name].type, "length", None)
            value = value.replace("\x00", "\ufffd")
            out[name] = value[:length] if length else value
    return out


def insert_new(connection: sa.Connection, table: sa.Table, key: str) -> Any:
    """INSERT that skips rows whose ``key`` is already stored (a record written twice is stored once)."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing(index_elements=[key])
