"""Database engines and schema migrations (Alembic), for SQLite (default) and PostgreSQL."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_MIGRATION_LOCK = 774_420_446  # PostgreSQL advisory lock id: one process migrates at a time


def engine_for(url: str, connect_timeout: float = 10.0, **options: Any) -> sa.Engine:
    """An engine for ``sqlite:///file`` (WAL mode, busy timeout) or ``postgresql://...`` (psycopg 3).
    Connecting to PostgreSQL gives up after ``connect_timeout`` seconds (at least 2, libpq's minimum)."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **options)

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    connect_args = {} if "connect_timeout=" in url else {"connect_timeout": max(2, math.ceil(connect_timeout))}
    if "poolclass" not in options:
        options = {"pool_size": 5, "max_overflow": 5, **options}
    return sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args, **options)


def _alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def migrate(engine: sa.Engine) -> None:
    """Bring the schema to the newest migration (idempotent; serialised across processes on PostgreSQL)."""
    config = _alembic_config()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


@functools.cache
def head_revision() -> str:
    """The newest migration of this code."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def schema_revision(connection: sa.Connection) -> str | None:
    """The migration the database is at; None when none has run."""
    if not sa.inspect(connection).has_table("alembic_version"):
        return None
    value = connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    return None if value is None else str(value)
