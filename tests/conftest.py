"""Fixtures only: helpers are in support.py (a test never imports from here)."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import respx
from starlette.testclient import TestClient

from cds_service.config import Config, ServiceSettings
from cds_service.engine.policy import PolicySet, load_policies
from cds_service.hooks.service import CoverageService
from cds_service.paths import data_dir
from cds_service.web.app import create_app

from .support import ES, JWKS_URL, PG_ENV, RS, make_config, pg_schema_url


@pytest.fixture(scope="session")
def policies() -> PolicySet:
    return load_policies(data_dir("policies"))


@pytest.fixture(scope="session")
def service(policies: PolicySet) -> CoverageService:
    """The packaged policies, for the test payer, deciding on the day the scenarios were written for."""
    return CoverageService.from_config(Config(service=ServiceSettings(payer_name="Test Health Plan")),
                                       policies=policies, today=lambda: dt.date(2026, 6, 1))


BACKENDS = ["sqlite"] + (["postgresql"] if os.environ.get(PG_ENV) else [])


@pytest.fixture(params=BACKENDS)
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database: SQLite always; PostgreSQL too when CDS_TEST_POSTGRES_URL is set."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cds.sqlite3'}"
    else:
        yield from pg_schema_url(os.environ[PG_ENV])


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cds.sqlite3'}"


@pytest.fixture
def client(sqlite_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(make_config(sqlite_url)), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def jwks() -> Iterator[respx.MockRouter]:
    """The EHR's JWK Set (support.ES and support.RS) served at support.JWKS_URL."""
    with respx.mock(assert_all_called=False) as router:
        router.get(JWKS_URL).mock(return_value=httpx.Response(200, json={"keys": [ES.jwk, RS.jwk]}))
        yield router
