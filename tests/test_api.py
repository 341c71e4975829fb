"""The CDS Hooks interface: discovery, request validation, errors, CORS, feedback, public requests."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from cds_service.hooks.service import CoverageService
from cds_service.storage.store import Store
from cds_service.web.app import create_app

from .support import FIXTURES, HOOK_CORPUS, SERVICE_FOR_HOOK, hook_request, load, make_config, scenario_request

SIGN = "/cds-services/coverage-requirements-order-sign"
SELECT = "/cds-services/coverage-requirements-order-select"
KETAMINE = load(FIXTURES / "scenarios/mp446-ketamine-iv-chronic-pain.json")


def no_nulls_or_empty_lists(value: Any, path: str = "") -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            assert item is not None, f"{path}.{key} is null"
            no_nulls_or_empty_lists(item, f"{path}.{key}")
    elif isinstance(value, list):
        # CDS Hooks: no empty arrays, except "no guidance" cards; CRD requires systemActions on order-sign
        assert value or path in (".cards", ".systemActions"), f"{path} is an empty array"
        for i, item in enumerate(value):
            no_nulls_or_empty_lists(item, f"{path}[{i}]")


def assert_outcome(response: Any, status: int, text: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert text in body["issue"][0]["diagnostics"]
    assert "Traceback" not in response.text


def test_discovery_lists_a_service_per_hook(client: TestClient) -> None:
    response = client.get("/cds-services")
    assert response.status_code == 200
    services = {s["hook"]: s for s in response.json()["services"]}
    assert set(services) == {"order-select", "order-sign", "order-dispatch", "appointment-book"}
    for hook, service in services.items():
        assert service["id"] == SERVICE_FOR_HOOK[hook]
        assert service["title"] and service["description"] and service["usageRequirements"]
        assert service["extension"]["davinci-crd.version"] == ["2.0", "2.2"]
        for key, query in service["prefetch"].items():
            # patient-scoped searches; the orders a hook names by reference in CDS Hooks 3.0 FHIRPath
            assert "{{context.patientId}}" in query or ".resolve().ofType(" in query, key
        observations = service["prefetch"]["observations"]
        assert "Observation?patient={{context.patientId}}&code=http://loinc.org|72514-3" in observations
        # what the EHR must grant names every type the templates search (the same searches the service runs)
        searched = {query.split("?", 1)[0] for query in service["prefetch"].values()}
        granted = set(service["usageRequirements"].split(" granting search of ", 1)[1].split(" for the patient")[0]
                      .replace(" and ", ", ").split(", "))
        assert searched | {"Medication"} == granted
        assert ("QuestionnaireResponse" in searched) is (hook != "order-select")
        options = service["extension"]["davinci-crd.configuration-options"]
        assert any(o["type"] == "boolean" and o["code"] == "coverage-info" for o in options)
    no_nulls_or_empty_lists(response.json())


def test_hook_answers_cards_and_system_actions(client: TestClient) -> None:
    response = client.post(SIGN, json=scenario_request(KETAMINE))
    assert response.status_code == 200
    body = response.json()
    assert len(body["cards"]) == 1 and len(body["systemActions"]) == 1
    card = body["cards"][0]
    assert card["source"]["label"] == "Example Health Plan"
    assert card["source"]["topic"]["code"] == "coverage-info"
    assert card["links"][0]["url"] == "http://testserver/policies/MP-446"
    no_nulls_or_empty_lists(body)


def test_same_request_same_decisions(client: TestClient) -> None:
    body = scenario_request(KETAMINE)

    def stable(response: Any) -> Any:
        data = copy.deepcopy(response.json())
        for card in data["cards"]:
            card.pop("uuid")
        for action in data["systemActions"]:
            action["resource"]["extension"][0]["extension"] = [
                e for e in action["resource"]["extension"][0]["extension"] if e["url"] != "coverage-assertion-id"]
        return data

    assert stable(client.post(SIGN, json=body)) == stable(client.post(SIGN, json=body))


def test_no_order_in_scope_gives_empty_cards(client: TestClient) -> None:
    walker = {"resourceType": "DeviceRequest", "id": "w", "status": "draft", "intent": "order",
              "codeCodeableConcept": {"coding": [{"system": "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
                                                  "code": "E0130"}]}, "subject": {"reference": "Patient/p1"},
              "authoredOn": "2026-06-01", "requester": {"reference": "Practitioner/dr1"}}
    response = client.post(SIGN, json=hook_request([walker], prefetch={}))
    assert response.status_code == 200
    # CRD hook-16: on order-sign every order carries coverage information, here "not assessed by this service"
    answer = response.json()
    assert answer["cards"] == [] and [a["resource"]["id"] for a in answer["systemActions"]] == ["w"]
    info = {p["url"]: p for p in answer["systemActions"][0]["resource"]["extension"][0]["extension"]}
    assert info["covered"]["valueCode"] == "conditional"
    assert "Not assessed" in info["reason"]["valueCodeableConcept"]["text"]
    response = client.post(SELECT, json=hook_request([walker], prefetch={}, hook="order-select"))
    assert response.json() == {"cards": []}


def test_configuration_can_turn_cards_off(client: TestClient) -> None:
    body = scenario_request(KETAMINE)
    body["extension"] = {"davinci-crd.configuration": {"coverage-info": False, "unknown-option": 3}}
    data = client.post(SIGN, json=body).json()
    assert data["cards"] == [] and len(data["systemActions"]) == 1


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda b: b.pop("hook"), "hook is required"),
    (lambda b: b.update(hook="order-select"), "does not match this service"),
    (lambda b: b.pop("hookInstance"), "hookInstance is required"),
    (lambda b: b.update(hookInstance=7), "hookInstance must be a non-empty string"),
    (lambda b: b.pop("context"), "context is required"),
    (lambda b: b["context"].pop("patientId"), "context.patientId is required"),
    (lambda b: b["context"].pop("userId"), "context.userId is required"),
    (lambda b: b["context"].update(draftOrders=[]), "context.draftOrders is required and must be a FHIR Bundle"),
    (lambda b: b["context"]["draftOrders"].update(resourceType="Patient"), "must be a FHIR Bundle"),
    (lambda b: b.update(prefetch=[]), "prefetch must be an object"),
    (lambda b: b.update(fhirAuthorization={"access_token": "x", "token_type": "Bearer"}),
     "fhirServer is required when fhirAuthorization"),
    (lambda b: b.update(fhirServer="https://ehr.example/fhir",
                        fhirAuthorization={"access_token": "x", "token_type": "MAC"}),
     "token_type must be 'Bearer'"),
])
def test_request_validation(client: TestClient, mutate: Any, message: str) -> None:
    body = scenario_request(KETAMINE)
    mutate(body)
    assert_outcome(client.post(SIGN, json=body), 400, message)


def test_order_select_requires_selections(client: TestClient) -> None:
    body = scenario_request(KETAMINE)
    body["hook"] = "order-select"
    assert_outcome(client.post(SELECT, json=body), 400, "context.selections is required")


def test_in_scope_order_with_a_cosmetic_fault_is_decided(client: TestClient) -> None:
    body = scenario_request(KETAMINE)
    body["context"]["draftOrders"]["entry"][0]["resource"]["status"] = 12
    response = client.post(SIGN, json=body)
    assert response.status_code == 200
    assert response.json()["cards"][0]["summary"].startswith("Not covered")


def test_malformed_json_is_a_400(client: TestClient) -> None:
    response = client.post(SIGN, content=b'{"hook": ', headers={"content-type": "application/json"})
    assert_outcome(response, 400, "not valid JSON")
    assert_outcome(client.post(SIGN, content=b"[1, 2]"), 400, "must be a JSON object")
    assert_outcome(client.post(SIGN, content=b""), 400, "empty")


def test_unknown_service_is_404(client: TestClient) -> None:
    assert_outcome(client.post("/cds-services/nope", json={}), 404, "no service")
    assert_outcome(client.post("/cds-services/nope/feedback", json={}), 404, "no service")


def test_wrong_method_is_405(client: TestClient) -> None:
    response = client.get(SIGN)
    assert response.status_code == 405
    assert response.json()["resourceType"] == "OperationOutcome"
    assert client.delete("/cds-services").status_code == 405


def test_body_over_limit_is_413(sqlite_url: str) -> None:
    with TestClient(create_app(make_config(sqlite_url, max_body_bytes=1000))) as small:
        body = scenario_request(KETAMINE)
        assert_outcome(small.post(SIGN, json=body), 413, "larger than 1000 bytes")

        def chunks() -> Any:  # no Content-Length: the limit applies while streaming
            for _ in range(100):
                yield b" " * 100

        assert small.post(SIGN, content=chunks()).status_code == 413


@pytest.mark.parametrize("path", [SIGN, SIGN + "/feedback", "/fhir/Questionnaire/$questionnaire-package",
                                  "/fhir/ValueSet/$expand"])
def test_every_endpoint_with_a_body_refuses_one_over_the_limit_alike(sqlite_url: str, path: str) -> None:
    with TestClient(create_app(make_config(sqlite_url, max_body_bytes=1000)), raise_server_exceptions=False) as small:
        response = small.post(path, content=b" " * 2000, headers={"Content-Type": "application/json"})
    assert_outcome(response, 413, "larger than 1000 bytes")
    assert response.json()["issue"][0]["code"] == "too-costly"


def test_cors_preflight_allows_authorization(client: TestClient) -> None:
    response = client.options(SIGN, headers={
        "Origin": "https://sandbox.cds-hooks.org",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    })
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] in ("*", "https://sandbox.cds-hooks.org")
    assert "authorization" in response.headers["access-control-allow-headers"].lower()
    simple = client.get("/cds-services", headers={"Origin": "https://sandbox.cds-hooks.org"})
    assert simple.headers["access-control-allow-origin"] in ("*", "https://sandbox.cds-hooks.org")


def test_health(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}


def test_policy_text_is_served(client: TestClient) -> None:
    response = client.get("/policies/MP-442")
    assert response.status_code == 200 and "Policy Number: MP-442" in response.text
    assert response.headers["content-type"].startswith("text/html")
    assert client.get("/policies/MP-999").status_code == 404


FEEDBACK = "/cds-services/coverage-requirements-order-sign/feedback"
GOOD_OVERRIDE = {"card": "9c1e6e1a-0000-4000-8000-000000000001", "outcome": "overridden",
                 "overrideReason": {"reason": {"code": "patient-refused", "system": "http://example.org/reasons",
                                               "display": "Patient refused"}, "userComment": "discussed"},
                 "outcomeTimestamp": "2026-06-01T10:00:00Z"}


def test_feedback_accepted(client: TestClient) -> None:
    response = client.post(FEEDBACK, json={"feedback": [GOOD_OVERRIDE, {
        "card": "9c1e6e1a-0000-4000-8000-000000000002", "outcome": "accepted",
        "acceptedSuggestions": [{"id": "s1"}], "outcomeTimestamp": "2026-06-01T10:00:00+00:00"}]})
    assert response.status_code == 200


@pytest.mark.parametrize(("entry", "message"), [
    ({**GOOD_OVERRIDE, "card": None}, "card is required"),
    ({**GOOD_OVERRIDE, "outcome": "ignored"}, "outcome must be"),
    ({**GOOD_OVERRIDE, "outcomeTimestamp": None}, "outcomeTimestamp is required"),
    ({**GOOD_OVERRIDE, "outcomeTimestamp": "yesterday"}, "not an ISO 8601"),
    ({**GOOD_OVERRIDE, "outcome": "accepted", "overrideReason": None}, "needs acceptedSuggestions"),
    ({**GOOD_OVERRIDE, "overrideReason": {"reason": "no"}}, "must be a Coding"),
])
def test_feedback_validation(client: TestClient, entry: dict[str, Any], message: str) -> None:
    entry = {k: v for k, v in entry.items() if v is not None}
    assert_outcome(client.post(FEEDBACK, json={"feedback": [entry]}), 400, message)
    assert_outcome(client.post(FEEDBACK, json={"feedback": []}), 400, "non-empty 'feedback'")


@pytest.mark.parametrize("path", HOOK_CORPUS, ids=[p.stem for p in HOOK_CORPUS])
def test_public_requests_get_200_or_a_clear_4xx(client: TestClient, path: Path) -> None:
    body = json.loads(path.read_text())
    hook = str(body.get("hook")) if isinstance(body, dict) else ""
    response = client.post(f"/cds-services/{SERVICE_FOR_HOOK.get(hook, 'coverage-requirements-order-sign')}",
                           json=body)
    assert response.status_code < 500, response.text
    if response.status_code == 200:
        no_nulls_or_empty_lists(response.json())
    else:  # 412: the orders order-dispatch names are neither prefetched nor readable
        assert response.status_code in (400, 412)
        assert response.json()["issue"][0]["diagnostics"]


def test_a_fault_of_the_service_is_a_500_that_is_still_audited(sqlite_url: str, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    async def broken(self: CoverageService, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("decision failed for patient Jane Doe")

    monkeypatch.setattr(CoverageService, "handle", broken)
    body = scenario_request(KETAMINE)
    with TestClient(create_app(make_config(sqlite_url)), raise_server_exceptions=False) as client:
        assert_outcome(client.post(SIGN, json=body), 500, "internal error")
    store = Store(sqlite_url, writer="none")
    try:
        deadline = time.monotonic() + 10
        while not list(store.audit_export()) and time.monotonic() < deadline:
            time.sleep(0.05)
        exported = list(store.audit_export())
    finally:
        store.close()
    assert [(row["hook_instance"], row["status_code"]) for row in exported] == [(body["hookInstance"], 500)]
    assert "RuntimeError" in caplog.text and "Jane Doe" not in caplog.text
