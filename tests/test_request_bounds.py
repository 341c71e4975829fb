"""Request-level bounds (issue 15, item 1): orders per request, the order-select selection lookup, and
the size of a response."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
from starlette.testclient import TestClient

from cds_service.engine.orders import OrderFacts
from cds_service.hooks.cards import MAX_DETAIL, MAX_EVIDENCE
from cds_service.hooks.request import MAX_ORDERS
from cds_service.hooks.service import CoverageService
from cds_service.jsonutil import dumps

from .support import FIXTURES, hook_request, load

SIGN = "/cds-services/coverage-requirements-order-sign"
SELECT = "/cds-services/coverage-requirements-order-select"
NO_TRIAL = load(FIXTURES / "scenarios/mp442-chronic-pain-no-trial.json")
PUMP, DRUG = NO_TRIAL["orders"]


def pumps_and_drugs(n: int) -> list[dict[str, Any]]:
    """n orders, half pump procedures and half pump drugs: every pump decision reads every drug."""
    orders = []
    for i in range(n):
        order = copy.deepcopy(PUMP if i % 2 == 0 else DRUG)
        order["id"] = f"o{i}"
        orders.append(order)
    return orders


@pytest.mark.parametrize("hook", ["order-sign", "order-select"])
def test_too_many_orders_is_refused_with_an_operation_outcome(client: TestClient, hook: str) -> None:
    orders = pumps_and_drugs(MAX_ORDERS + 1)
    body = hook_request(orders, NO_TRIAL["record"], hook=hook, selections=[f"ServiceRequest/{o['id']}"
                                                                           for o in orders[:2]])
    response = client.post(SIGN if hook == "order-sign" else SELECT, json=body)
    assert response.status_code == 422
    issue = response.json()["issue"][0]
    assert issue["code"] == "too-costly" and f"at most {MAX_ORDERS} draft orders" in issue["diagnostics"]


def test_too_many_selections_is_refused(client: TestClient) -> None:
    body = hook_request(pumps_and_drugs(2), hook="order-select",
                        selections=[f"ServiceRequest/x{i}" for i in range(MAX_ORDERS + 1)])
    response = client.post(SELECT, json=body)
    assert response.status_code == 422 and "selections" in response.json()["issue"][0]["diagnostics"]


def test_selection_lookup_is_linear(service: CoverageService, monkeypatch: pytest.MonkeyPatch) -> None:
    """Selections are looked up by "Type/id" in a set: no order is compared with every selection."""
    calls = []
    original = OrderFacts.matches_reference

    def counting(self: OrderFacts, reference: str) -> bool:
        calls.append(reference)
        return original(self, reference)

    monkeypatch.setattr(OrderFacts, "matches_reference", counting)
    orders = pumps_and_drugs(MAX_ORDERS)
    selections = [f"http://ehr.example/fhir/{o['resourceType']}/{o['id']}" for o in orders]
    request = service.parse("coverage-requirements-order-select",
                            hook_request(orders, hook="order-select", selections=selections))
    scope = service.in_scope(request)
    assert {item.order.id for item in scope.items} >= {o["id"] for o in orders if o["resourceType"] == "ServiceRequest"}
    assert len(calls) == 0


def test_response_size_is_bounded(service: CoverageService) -> None:
    """The worst case the bounds allow: MAX_ORDERS orders, all in scope, each pump reading every drug."""
    orders = pumps_and_drugs(MAX_ORDERS)
    body = hook_request(orders, NO_TRIAL["record"])
    body_size = len(dumps(body))
    result = asyncio.run(service.handle("coverage-requirements-order-sign", body, "https://cds.example.org"))
    size = len(dumps(result.response))
    assert len(result.response["systemActions"]) == MAX_ORDERS  # the pumps decided, the drugs "not assessed"
    for card in result.response["cards"]:
        assert len(card["detail"]) <= MAX_DETAIL
        assert card["detail"].count("\n- `") <= MAX_EVIDENCE  # evidence lines; the trace keeps them all
    assert any("more (in the decision trace)" in c["detail"] for c in result.response["cards"])
    # the echoed orders, plus a few KiB per order
    assert size < body_size + MAX_ORDERS * 24_000, size
