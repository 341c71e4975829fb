"""Patient data: prefetch, the EHR's FHIR server (mocked with respx), and honest degradation."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest
import respx
from starlette.testclient import TestClient

from cds_service.fhir.gather import DataUnavailable
from cds_service.hooks.service import CoverageService, HookResult
from cds_service.web.app import create_app

from .conftest import make_config
from .support import FIXTURES, load, prefetch_for, scenario_request, searchset

FHIR = "https://ehr.example.org/fhir"
TOKEN = "secret-access-token-5f1b"
TRIAL = load(FIXTURES / "scenarios/mp442-chronic-pain-successful-trial.json")
SIGN = "coverage-requirements-order-sign"


def with_server(body: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    for key in drop:
        body["prefetch"].pop(key, None)
    body["fhirServer"] = FHIR
    body["fhirAuthorization"] = {"access_token": TOKEN, "token_type": "Bearer", "expires_in": 300,
                                 "scope": "patient/*.read", "subject": "cds-service"}
    return body


def run(service: CoverageService, body: dict[str, Any]) -> HookResult:
    return asyncio.run(service.handle(SIGN, body, "https://cds.example.org"))


def pump_decision(result: HookResult) -> Any:
    return next(d for d in result.decisions if d.order_reference == "ServiceRequest/pump")


def by_type(resource_type: str) -> list[dict[str, Any]]:
    return [r for r in TRIAL["record"] if r["resourceType"] == resource_type]


def mock_searches(router: respx.MockRouter, empty: tuple[str, ...] = ()) -> None:
    for rtype in ("Condition", "Observation", "Procedure", "MedicationStatement", "MedicationAdministration",
                  "AllergyIntolerance", "Coverage"):
        router.get(url__startswith=f"{FHIR}/{rtype}?").mock(
            return_value=httpx.Response(200, json=searchset([] if rtype in empty else by_type(rtype))))


def test_complete_prefetch_makes_no_server_call(service: CoverageService) -> None:
    with respx.mock(assert_all_called=False) as router:
        route = router.route(url__startswith=FHIR)
        result = run(service, with_server(scenario_request(TRIAL)))
    assert not route.called
    assert pump_decision(result).outcome.value == "covered"


def test_missing_keys_are_read_from_the_fhir_server_with_the_token(service: CoverageService) -> None:
    body = with_server(scenario_request(TRIAL), drop=("observations", "procedures", "conditions"))
    with respx.mock(assert_all_called=False) as router:
        mock_searches(router)
        result = run(service, body)
        calls = list(router.calls)
    assert pump_decision(result).outcome.value == "covered"
    paths = sorted(c.request.url.path for c in calls)
    assert paths == ["/fhir/Condition", "/fhir/Observation", "/fhir/Procedure"]
    for call in calls:
        assert call.request.headers["authorization"] == f"Bearer {TOKEN}"
        assert call.request.url.params["patient"] == "p1"
    observation = next(c for c in calls if c.request.url.path.endswith("Observation"))
    assert "http://loinc.org|72514-3" in observation.request.url.params["code"]


def test_null_prefetch_key_means_no_data_and_no_fetch(service: CoverageService) -> None:
    body = with_server(scenario_request(TRIAL))
    body["prefetch"]["procedures"] = None
    with respx.mock(assert_all_called=False) as router:
        route = router.route(url__startswith=FHIR)
        result = run(service, body)
    assert not route.called
    decision = pump_decision(result)
    assert decision.outcome.value == "conditional" and decision.rule_id == "chronic-intractable-pain"


def test_operation_outcome_prefetch_is_refetched(service: CoverageService) -> None:
    body = with_server(scenario_request(TRIAL))
    body["prefetch"]["observations"] = {"resourceType": "OperationOutcome",
                                        "issue": [{"severity": "error", "code": "timeout"}]}
    with respx.mock(assert_all_called=False) as router:
        mock_searches(router)
        result = run(service, body)
        assert [c.request.url.path for c in router.calls] == ["/fhir/Observation"]
    assert pump_decision(result).outcome.value == "covered"


def test_operation_outcome_without_server_is_412(service: CoverageService) -> None:
    body = scenario_request(TRIAL)
    body["prefetch"]["observations"] = {"resourceType": "OperationOutcome",
                                        "issue": [{"severity": "error", "code": "exception"}]}
    with pytest.raises(DataUnavailable, match="observations"):
        run(service, body)


def test_server_that_pages_is_followed(service: CoverageService) -> None:
    body = with_server(scenario_request(TRIAL), drop=("observations",))
    first, second = by_type("Observation")[:1], by_type("Observation")[1:]
    page1 = {**searchset(first), "link": [{"relation": "next", "url": f"{FHIR}/Observation?page=2"}]}
    with respx.mock(assert_all_called=True) as router:
        router.get(f"{FHIR}/Observation?page=2").mock(return_value=httpx.Response(200, json=searchset(second)))
        router.get(url__startswith=f"{FHIR}/Observation?patient=").mock(return_value=httpx.Response(200, json=page1))
        result = run(service, body)
    assert pump_decision(result).outcome.value == "covered"


def test_next_link_off_the_server_is_not_followed(service: CoverageService) -> None:
    body = with_server(scenario_request(TRIAL), drop=("observations",))
    page1 = {**searchset(by_type("Observation")), "link": [{"relation": "next", "url": "https://evil.example/steal"}]}
    with respx.mock(assert_all_called=False) as router:
        router.get(url__startswith=f"{FHIR}/Observation?").mock(return_value=httpx.Response(200, json=page1))
        evil = router.route(host="evil.example")
        result = run(service, body)
    assert not evil.called
    decision = pump_decision(result)
    assert decision.outcome.value == "conditional" and decision.technical


@pytest.mark.parametrize(("response", "why"), [
    (httpx.Response(500), "HTTP 500"),
    (httpx.Response(401), "HTTP 401"),
    (httpx.Response(200, content=b"<html>not json"), "invalid JSON"),
    (httpx.Response(200, json={"resourceType": "Patient", "id": "x"}), "did not answer with a Bundle"),
    (httpx.TimeoutException("slow"), "timed out"),
    (httpx.ConnectError("down"), "unreachable"),
])
def test_server_faults_give_an_honest_conditional(service: CoverageService, response: Any, why: str) -> None:
    body = with_server(scenario_request(TRIAL), drop=("observations",))
    with respx.mock(assert_all_called=False) as router:
        route = router.get(url__startswith=f"{FHIR}/Observation?")
        if isinstance(response, Exception):
            route.mock(side_effect=response)
        else:
            route.mock(return_value=response)
        result = run(service, body)
    decision = pump_decision(result)
    assert decision.outcome.value == "conditional"
    assert decision.rule_id == "data-unavailable"
    assert why in decision.technical["Observation"]
    action = result.response["systemActions"][0]["resource"]
    ext = {e["url"]: e for e in action["extension"][0]["extension"]}
    assert ext["covered"]["valueCode"] == "conditional"
    assert ext["reason"]["valueCodeableConcept"]["coding"][0]["code"] == "NAV"  # CRD 2.0.1 has no 'technical'
    assert "info-needed" in ext and "doc-needed" not in ext
    assert "could not be read" in result.response["cards"][0]["detail"]


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_oversized_page_is_a_fault_not_data(service: CoverageService, monkeypatch: pytest.MonkeyPatch,
                                            declared: bool) -> None:
    monkeypatch.setattr("cds_service.fhir.client.MAX_PAGE_BYTES", 4096)
    page = httpx.Response(200, json=searchset(by_type("Observation") * 40)).content
    assert len(page) > 4096

    async def chunks() -> Any:
        for start in range(0, len(page), 1000):
            yield page[start:start + 1000]

    body = with_server(scenario_request(TRIAL), drop=("observations",))
    with respx.mock(assert_all_called=False) as router:
        router.get(url__startswith=f"{FHIR}/Observation?").mock(
            return_value=httpx.Response(200, content=page if declared else chunks()))
        result = run(service, body)
    decision = pump_decision(result)
    assert decision.outcome.value == "conditional" and decision.rule_id == "data-unavailable"
    assert "more than 4096 bytes" in decision.technical["Observation"]


def test_slow_server_is_cut_at_the_time_budget(policies: Any) -> None:
    from cds_service.hooks.service import Settings
    from cds_service.paths import data_dir

    fast = CoverageService(policies, data_dir("cards"), Settings(fhir_timeout_seconds=0.2))
    body = with_server(scenario_request(TRIAL), drop=("observations",))

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(2)
        return httpx.Response(200, json=searchset([]))

    with respx.mock(assert_all_called=False) as router:
        router.get(url__startswith=f"{FHIR}/Observation?").mock(side_effect=slow)
        result = run(fast, body)
    assert pump_decision(result).technical["Observation"].startswith("timed out")


def test_unreadable_data_the_decision_did_not_use_keeps_it_firm(service: CoverageService) -> None:
    """IV ketamine with a stated psychiatric indication: the terminal-cancer rule never needed the
    problem list, so a failed Condition query does not blur the decision."""
    scenario = load(FIXTURES / "scenarios/mp446-ketamine-iv-trd-snomed.json")
    body = with_server(scenario_request(scenario), drop=("conditions",))
    with respx.mock(assert_all_called=False) as router:
        router.get(url__startswith=f"{FHIR}/Condition?").mock(return_value=httpx.Response(503))
        result = run(service, body)
    assert result.decisions[0].outcome.value == "not-covered"


def test_neither_prefetch_nor_server_is_412(client: TestClient) -> None:
    body = scenario_request(TRIAL)
    body["prefetch"] = {}
    response = client.post(f"/cds-services/{SIGN}", json=body)
    assert response.status_code == 412
    assert response.json()["resourceType"] == "OperationOutcome"


def test_plain_http_server_off_loopback_is_never_contacted(client: TestClient) -> None:
    body = with_server(scenario_request(TRIAL), drop=("observations",))
    body["fhirServer"] = "http://ehr.example.org/fhir"
    with respx.mock(assert_all_called=False) as router:
        route = router.route(host="ehr.example.org")
        response = client.post(f"/cds-services/{SIGN}", json=body)
    assert not route.called
    assert response.status_code == 412 and "https" in response.text


def test_invalid_resources_are_skipped_and_named(service: CoverageService) -> None:
    """An invalid pain score that would have been the trial's result is skipped, named in the trace,
    and the decision is made on the valid scores."""
    body = scenario_request(TRIAL)
    broken = {"resourceType": "Observation", "id": "broken", "status": "final", "subject": "not a reference",
              "code": {"coding": [{"system": "http://loinc.org", "code": "72514-3"}]}, "valueInteger": 1,
              "effectiveDateTime": "2026-05-01T12:00:00Z", "partOf": [{"reference": "Procedure/trial"}]}
    body["prefetch"]["observations"]["entry"].append({"resource": broken})
    body["prefetch"]["conditions"]["entry"].append({"fullUrl": "urn:uuid:x"})  # an entry with no resource
    del body["prefetch"]["observations"]["type"]
    result = run(service, body)
    decision = pump_decision(result)
    assert decision.outcome.value == "covered"
    assert any(s.startswith("Observation/broken: subject") for s in decision.skipped_resources)
    assert "Observation/broken" in str(decision.explain())


def test_large_record_validates_only_what_decisions_use(service: CoverageService) -> None:
    bundle = load(FIXTURES / "records/synthea-bradly-douglas-chronic-pain-migraine.json")
    resources = [e["resource"] for e in bundle["entry"]]
    body = scenario_request(TRIAL)
    body["prefetch"] = prefetch_for(resources)
    body["prefetch"]["everything"] = bundle
    record = asyncio.run(service.record_for(service.parse(SIGN, body), service.policies.policies, None))
    observations = record.get("Observation")
    assert observations and all(o.code.coding[0].code == "72514-3" for o in observations)
    assert record.get("Claim") == [] and record.get("Encounter") == []
    assert len(record.get("Condition")) == 7


def test_token_is_never_logged_or_stored(sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    body = with_server(scenario_request(TRIAL), drop=("observations",))
    with respx.mock(assert_all_called=False) as router, \
            TestClient(create_app(make_config(sqlite_url))) as client:
        router.get(url__startswith=f"{FHIR}/Observation?").mock(return_value=httpx.Response(500))
        assert client.post(f"/cds-services/{SIGN}", json=body).status_code == 200
        store = client.app.state.cds.store  # type: ignore[attr-defined]
    records = list(store.audit_export())
    assert len(records) == 1 and records[0]["request"]["fhirAuthorization"]["subject"] == "cds-service"
    assert TOKEN not in str(records)
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(store.__dict__)
