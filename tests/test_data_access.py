"""Patient data: prefetch, the EHR's FHIR server (mocked with respx), and honest degradation."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest
import respx
from starlette.testclient import TestClient

from cds_service.config import Config
from cds_service.fhir.client import SERVER_UNREADABLE
from cds_service.fhir.gather import DataUnavailable
from cds_service.hooks.service import CoverageService, HookResult
from cds_service.urls import Allowlist
from cds_service.web.app import create_app

from .support import FIXTURES, PREFETCH_KEYS, load, make_config, prefetch_for, run, scenario_request, searchset

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
    (httpx.Response(404), "HTTP 404"),
    (httpx.Response(200, content=b"<html>not json"), "invalid JSON"),
    (httpx.Response(200, json={"resourceType": "Patient", "id": "x"}), "not a Bundle"),
    (httpx.TimeoutException("slow"), "timed out"),
    (httpx.ConnectError("down"), "unreachable (ConnectError)"),
])
def test_server_faults_give_an_honest_conditional(service: CoverageService, response: Any, why: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The clinician learns that the EHR's FHIR server could not be read, never how it failed (a status or
    an exception name would make the card a port scanner's oracle); the log keeps the detail."""
    caplog.set_level(logging.WARNING, logger="cds_service.fhir")
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
    assert decision.technical["Observation"] == SERVER_UNREADABLE
    action = result.response["systemActions"][0]["resource"]
    ext = {e["url"]: e for e in action["extension"][0]["extension"]}
    assert ext["covered"]["valueCode"] == "conditional"
    assert ext["reason"]["valueCodeableConcept"]["coding"][0]["code"] == "NAV"  # CRD 2.0.1 has no 'technical'
    assert "info-needed" in ext and "doc-needed" not in ext
    assert "could not be read" in result.response["cards"][0]["detail"]
    assert why in caplog.text
    assert why.split(" (")[0] not in str(result.response) and why not in str(decision.explain())


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_oversized_page_is_a_fault_not_data(service: CoverageService, monkeypatch: pytest.MonkeyPatch,
                                            declared: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cds_service.fhir")
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
    assert decision.technical["Observation"] == SERVER_UNREADABLE
    assert "more than 4096 bytes in one page" in caplog.text


def test_slow_server_is_cut_at_the_time_budget(policies: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cds_service.fhir")
    config = Config()
    config.fhir.timeout_seconds = 0.2
    fast = CoverageService.from_config(config, policies=policies)
    body = with_server(scenario_request(TRIAL), drop=("observations",))

    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(2)
        return httpx.Response(200, json=searchset([]))

    with respx.mock(assert_all_called=False) as router:
        router.get(url__startswith=f"{FHIR}/Observation?").mock(side_effect=slow)
        result = run(fast, body)
    assert pump_decision(result).technical["Observation"] == SERVER_UNREADABLE
    assert "timed out after 0.2 s" in caplog.text


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
    """An invalid pain score (malformed in its value, which the decision reads) that would have been the
    trial's result is skipped, named in the trace, and the decision is made on the valid scores."""
    body = scenario_request(TRIAL)
    broken = {"resourceType": "Observation", "id": "broken", "status": "final", "subject": {"reference": "Patient/p1"},
              "code": {"coding": [{"system": "http://loinc.org", "code": "72514-3"}]},
              "valueQuantity": {"value": 1, "code": 12},
              "effectiveDateTime": "2026-05-01T12:00:00Z", "partOf": [{"reference": "Procedure/trial"}]}
    body["prefetch"]["observations"]["entry"].append({"resource": broken})
    body["prefetch"]["conditions"]["entry"].append({"fullUrl": "urn:uuid:x"})  # an entry with no resource
    del body["prefetch"]["observations"]["type"]
    result = run(service, body)
    decision = pump_decision(result)
    assert decision.outcome.value == "covered"
    assert any(s.startswith("Observation/broken: valueQuantity.code") for s in decision.skipped_resources)
    assert "Observation/broken" in str(decision.explain())


def test_large_record_validates_only_what_decisions_use(service: CoverageService) -> None:
    bundle = load(FIXTURES / "records/synthea-bradly-douglas-chronic-pain-migraine.json")
    resources = [e["resource"] for e in bundle["entry"]]
    body = scenario_request(TRIAL)
    body["prefetch"] = prefetch_for(resources)
    body["prefetch"]["everything"] = bundle
    request = service.parse(SIGN, body)
    needs = service.needs_for(service.policies.policies)
    record = asyncio.run(service.gather(request, needs, service.fhir_access(request, None)))
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


# --- hardening (issue 15) -----------------------------------------------------------------------------------

@pytest.mark.parametrize("server", [
    f"{FHIR}/../admin",
    f"{FHIR}/%2e%2e/admin",
    f"{FHIR}/..%2Fadmin",
])
def test_fhir_server_dot_segments_cannot_escape_the_allowlist(service: CoverageService, server: str) -> None:
    body = with_server(scenario_request(TRIAL), drop=("observations",))
    body["fhirServer"] = server
    with respx.mock(assert_all_called=False) as router:
        anything = router.route()
        with pytest.raises(DataUnavailable):
            asyncio.run(service.handle(SIGN, body, "https://cds.example.org", Allowlist((FHIR,))))
    assert not anything.called


def test_paging_link_dot_segments_are_not_followed(service: CoverageService) -> None:
    body = with_server(scenario_request(TRIAL), drop=("observations",))
    escape = f"{FHIR}/../admin/Observation?page=2"
    page1 = {**searchset(by_type("Observation")), "link": [{"relation": "next", "url": escape}]}
    with respx.mock(assert_all_called=False) as router:
        router.get(url__startswith=f"{FHIR}/Observation?").mock(return_value=httpx.Response(200, json=page1))
        admin = router.route(path__startswith="/admin")
        result = run(service, body)
    assert not admin.called
    assert pump_decision(result).technical["Observation"] == SERVER_UNREADABLE


def test_unusable_paging_link_is_reported_as_such_not_as_a_timeout(service: CoverageService,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="cds_service.fhir")
    body = with_server(scenario_request(TRIAL), drop=("observations",))
    page1 = {**searchset(by_type("Observation")), "link": [{"relation": "next", "url": f"{FHIR}/Obs\x01?page=2"}]}
    with respx.mock(assert_all_called=False) as router:
        router.get(url__startswith=f"{FHIR}/Observation?").mock(return_value=httpx.Response(200, json=page1))
        result = run(service, body)
    assert pump_decision(result).outcome.value == "conditional"
    assert "a paging link is not usable: it contains a control character" in caplog.text
    assert "timed out" not in caplog.text


def test_every_query_value_is_encoded(service: CoverageService) -> None:
    body = with_server(scenario_request(TRIAL), drop=("observations",))
    patient = "p1&code=x,y|z#frag"
    body["context"]["patientId"] = patient
    with respx.mock(assert_all_called=False) as router:
        mock_searches(router)
        run(service, body)
        (call,) = router.calls
    assert call.request.url.params.get_list("patient") == [patient]
    assert "http://loinc.org|72514-3" in call.request.url.params["code"]
    assert len(call.request.url.params.get_list("code")) == 1


def test_total_read_from_the_fhir_server_is_capped_per_call(policies: Any) -> None:
    """Seven searches of many pages each would read far more than one call may: the searches past the cap
    are a named technical gap, and the decision conditional, never a crash or unbounded memory."""
    config = Config()
    config.fhir.max_total_bytes, config.fhir.max_resources = 64 * 1024, 1000
    capped = CoverageService.from_config(config, policies=policies)
    body = with_server(scenario_request(TRIAL), drop=tuple(body_key for body_key in PREFETCH_KEYS.values()))
    filler = [{**by_type("Observation")[0], "id": f"o{n}"} for n in range(60)]

    def endless(request: httpx.Request) -> httpx.Response:
        page = int(request.url.params.get("page", "1"))
        rtype = request.url.path.rsplit("/", 1)[-1]
        resources = [{**r, "resourceType": rtype} for r in filler]
        return httpx.Response(200, json={**searchset(resources), "link": [
            {"relation": "next", "url": f"{FHIR}/{rtype}?patient=p1&page={page + 1}"}]})

    with respx.mock(assert_all_called=False) as router:
        route = router.route(url__startswith=FHIR).mock(side_effect=endless)
        result = run(capped, body)
    page_size = min(len(call.response.content) for call in route.calls)
    searches = len(PREFETCH_KEYS)
    assert route.call_count <= searches + config.fhir.max_total_bytes // page_size  # not every search x 20 pages
    gaps = pump_decision(result).technical
    assert gaps and all("more data than this service reads for one call" in why for why in gaps.values())
    assert pump_decision(result).outcome.value == "conditional"


def test_resource_count_is_capped_per_call(policies: Any) -> None:
    config = Config()
    config.fhir.max_resources = 50
    capped = CoverageService.from_config(config, policies=policies)
    body = with_server(scenario_request(TRIAL), drop=("observations",))
    many = [{**by_type("Observation")[0], "id": f"o{n}"} for n in range(51)]
    with respx.mock(assert_all_called=False) as router:
        router.get(url__startswith=f"{FHIR}/Observation?").mock(return_value=httpx.Response(200, json=searchset(many)))
        result = run(capped, body)
    assert "at most" in pump_decision(result).technical["Observation"]


@pytest.mark.parametrize("entry", [5, "x", True, {"resource": {"resourceType": "Observation"}}])
def test_prefetch_bundle_whose_entry_is_not_an_array(service: CoverageService, client: TestClient,
                                                     entry: Any) -> None:
    """Unreadable prefetch data is read from the FHIR server when there is one, else the call is a 412."""
    body = with_server(scenario_request(TRIAL))
    body["prefetch"]["observations"] = {"resourceType": "Bundle", "type": "searchset", "entry": entry}
    with respx.mock(assert_all_called=False) as router:
        mock_searches(router)
        result = run(service, body)
        assert [c.request.url.path for c in router.calls] == ["/fhir/Observation"]
    assert pump_decision(result).outcome.value == "covered"
    del body["fhirServer"], body["fhirAuthorization"]
    response = client.post(f"/cds-services/{SIGN}", json=body)
    assert response.status_code == 412 and response.json()["resourceType"] == "OperationOutcome"


def test_a_medication_the_request_cannot_resolve_is_read_from_the_fhir_server(service: CoverageService) -> None:
    """Issue 18: a medicationReference to a Medication on the EHR's FHIR server (the prefetch cannot resolve
    it) is read with the hook's token, and the drug decided; when it cannot be read, the decision asks to
    confirm the drug."""
    scenario = load(FIXTURES / "scenarios" / "mp446-ketamine-medication-in-prefetch.json")
    scenario["record"] = [r for r in scenario["record"] if r["resourceType"] != "Medication"]
    body = with_server(scenario_request(scenario), drop=())
    medication = {"resourceType": "Medication", "id": "m-ket", "code": {"coding": [
        {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "238083"}]}}
    with respx.mock(assert_all_called=True) as router:
        route = router.get(f"{FHIR}/Medication", params={"_id": "m-ket"}).mock(
            return_value=httpx.Response(200, json=searchset([medication])))
        result = run(service, body)
    assert route.calls.last.request.headers["authorization"] == "Bearer " + TOKEN
    [decision] = result.decisions
    assert (decision.outcome.value, decision.rule_id) == ("not-covered", "chronic-pain")
    with respx.mock(assert_all_called=False) as router:
        router.get(url__startswith=FHIR).mock(return_value=httpx.Response(404))
        [decision] = run(service, body).decisions
    assert (decision.outcome.value, decision.rule_id) == ("conditional", "drug-unidentified")


def test_the_record_is_read_while_the_completed_forms_are(service: CoverageService) -> None:
    """The completed-form search and the record's searches overlap (the EHR's latency is paid once): the
    QuestionnaireResponse search answers only once the Condition search has arrived; read one after the other,
    it would run out of its time and the decision would say the forms could not be read."""
    body = with_server(scenario_request(TRIAL), drop=("conditions", "questionnaireResponses"))
    condition_asked = asyncio.Event()

    async def responses(request: httpx.Request) -> httpx.Response:
        await asyncio.wait_for(condition_asked.wait(), timeout=5)
        return httpx.Response(200, json=searchset([]))

    def conditions(request: httpx.Request) -> httpx.Response:
        condition_asked.set()
        return httpx.Response(200, json=searchset(by_type("Condition")))

    with respx.mock(assert_all_called=False) as router:
        router.get(url__startswith=f"{FHIR}/QuestionnaireResponse?").mock(side_effect=responses)
        condition = router.get(url__startswith=f"{FHIR}/Condition?").mock(side_effect=conditions)
        result = run(service, body)
    assert condition.call_count == 1  # read ahead once, not again when the record is assembled
    decision = pump_decision(result)
    assert decision.outcome.value == "covered" and not decision.technical
    assert not [n for n in decision.notes if "documentation forms" in n], decision.notes


@pytest.mark.parametrize("token", ["tök€n", "two words", "line\nbreak"])
def test_a_token_that_is_not_a_bearer_credential_is_never_sent(client: TestClient, token: str) -> None:
    """It cannot go in an Authorization header: the server is not read, and the answer says why at once
    (412 when the prefetch lacks data; with the prefetch complete, the call is answered as usual)."""
    body = with_server(scenario_request(TRIAL), drop=("observations",))
    body["fhirAuthorization"]["access_token"] = token
    with respx.mock(assert_all_called=False) as router:
        route = router.get(url__startswith=FHIR).mock(return_value=httpx.Response(200, json=searchset([])))
        missing = client.post(f"/cds-services/{SIGN}", json=body)
        complete = with_server(scenario_request(TRIAL))
        complete["fhirAuthorization"]["access_token"] = token
        answered = client.post(f"/cds-services/{SIGN}", json=complete)
    assert missing.status_code == 412 and "not a bearer token" in missing.text and route.call_count == 0
    assert answered.status_code == 200
