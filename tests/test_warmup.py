"""Issue 16: the service is warmed at start-up, in process: a decision per order for each policy trigger and hook,
and a read of a FHIR server of its own on loopback; nothing is audited, the process's FHIR connections are left
clean, and it works from inside a running event loop (uvicorn builds the app there)."""

from __future__ import annotations

import asyncio

from starlette.testclient import TestClient

from cds_service.engine.orders import order_facts
from cds_service.hooks.service import CoverageService
from cds_service.hooks.warmup import trigger_orders, warm_up
from cds_service.web.app import create_app

from .conftest import make_config


def test_there_is_a_warm_up_order_for_every_policy(service: CoverageService) -> None:
    orders = trigger_orders(service)
    systems = service.policies.systems
    governed = {policy.id for order in orders for policy in service.policies.policies
                if policy.trigger_for(order_facts(systems, order), []) is not None}
    assert governed == {policy.id for policy in service.policies.policies}


def test_warm_up_decides_reads_a_fhir_server_and_leaves_no_connection(service: CoverageService) -> None:
    done = warm_up(service)
    assert not done.failed
    assert done.decisions >= 4 * len(service.policies.policies)
    assert done.fhir_searches >= len(service.all_needs) - 1  # every search the decision needs, over keep-alive
    assert service.fhir_pool.origins() == []


def test_warm_up_runs_inside_a_running_event_loop(service: CoverageService) -> None:
    async def inside() -> bool:
        return warm_up(service).failed

    assert asyncio.run(inside()) is False


def test_warm_up_writes_no_audit_record(sqlite_url: str) -> None:
    with TestClient(create_app(make_config(sqlite_url))) as client:
        cds = client.app.state.cds  # type: ignore[attr-defined]
        assert not warm_up(cds.service).failed
        store = cds.store
    assert list(store.audit_export()) == []
