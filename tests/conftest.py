from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from cds_service.config import Config, StorageSettings
from cds_service.engine.policy import PolicySet, load_policies
from cds_service.hooks.service import CoverageService, Settings
from cds_service.paths import data_dir
from cds_service.web.app import create_app

PG_ENV = "CDS_TEST_POSTGRES_URL"


@pytest.fixture(scope="session")
def policies() -> PolicySet:
    return load_policies(data_dir("policies"))


@pytest.fixture(scope="session")
def service(policies: PolicySet) -> CoverageService:
    return CoverageService(policies, data_dir("cards"), Settings(payer_name="Test Health Plan"),
                           today=lambda: dt.date(2026, 6, 1))


def _pg_schema_url(base: str) -> Iterator[str]:
    schema = "t_" + uuid.uuid4().hex[:12]
    engine = sa.create_engine(base.replace("postgresql://", "postgresql+psycopg://", 1))
    with engine.begin() as connection:
        connection.execute(sa.text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as connection:
            connection.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


BACKENDS = ["sqlite"] + (["postgresql"] if os.environ.get(PG_ENV) else [])


@pytest.fixture(params=BACKENDS)
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database: SQLite always; PostgreSQL too when CDS_TEST_POSTGRES_URL is set."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cds.sqlite3'}"
    else:
        yield from _pg_schema_url(os.environ[PG_ENV])


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cds.sqlite3'}"


def make_config(url: str, **service: object) -> Config:
    """A config for in-process apps; the audit writer is a thread (a writer process per test app would
    only cost start-up time; the process writer is tested with real servers in test_storage.py)."""
    config = Config(storage=StorageSettings(url=url, audit_writer="thread"))
    for key, value in service.items():
        setattr(config.service, key, value)
    return config


@pytest.fixture
def client(sqlite_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(make_config(sqlite_url)), raise_server_exceptions=False) as test_client:
        yield test_client
