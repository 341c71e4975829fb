"""Issue 16: the service is warmed at start-up, in process: a decision per order for each policy trigger and hook,
and a read of a FHIR server of its own on loopback; nothing is audited or counted, the process's FHIR connections
are left clean, and `cds-service serve`'s app does it in its lifespan, before it answers."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from cds_service.engine.orders import order_facts
from cds_service.fhir import client as fhir_client
from cds_service.hooks.service import CoverageService
from cds_service.hooks.warmup import trigger_orders, warm
from cds_service.web.app import create_app
from cds_service.web.asgi import app_from_environment

from .support import make_config


def test_there_is_a_warm_up_order_for_every_policy(service: CoverageService) -> None:
    orders = trigger_orders(service)
    systems = service.policies.systems
    governed = {policy.id for order in orders for policy in service.policies.policies
                if policy.trigger_for(order_facts(systems, order), []) is not None}
    assert governed == {policy.id for policy in service.policies.policies}


def test_warm_up_decides_reads_a_fhir_server_and_leaves_no_connection(service: CoverageService) -> None:
    observed: list[str] = []
    fhir_client.read_observers.append(lambda outcome, seconds: observed.append(outcome))
    try:
        done = asyncio.run(warm(service))
    finally:
        fhir_client.read_observers.pop()
    assert not done.failed
    assert done.decisions >= 4 * len(service.policies.policies)
    assert done.fhir_searches >= len(service.all_needs) - 1  # every search the decision needs, over keep-alive
    assert service.fhir_pool.origins() == []
    assert observed == []  # the warm-up's reads are not counted as an EHR's


def test_warm_up_writes_no_audit_record(sqlite_url: str) -> None:
    with TestClient(create_app(make_config(sqlite_url))) as client:
        cds = client.app.state.cds  # type: ignore[attr-defined]
        assert not asyncio.run(warm(cds.service)).failed
        store = cds.store
    assert list(store.audit_export()) == []


def test_the_served_app_warms_in_its_lifespan_before_it_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "cds.toml"
    config.write_text(f'[storage]\nurl = "sqlite:///{tmp_path}/cds.sqlite3"\n')
    monkeypatch.setenv("CDS_SERVICE_CONFIG", str(config))
    caplog.set_level(logging.INFO, logger="cds_service.warmup")
    interval = sys.getswitchinterval()
    try:
        app = app_from_environment()
        assert not any("warm-up:" in r.getMessage() for r in caplog.records)  # building the app does not warm
        with TestClient(app) as client:
            assert any("warm-up:" in r.getMessage() and "decisions" in r.getMessage() for r in caplog.records)
            assert client.get("/health").status_code == 200
    finally:  # the entry point's process-wide settings, undone for the rest of the tests
        gc.unfreeze()
        sys.setswitchinterval(interval)
