"""The CRD card set per governed order (External Reference card with the policy link; Instructions card,
without links, when something must be documented; the Coverage Information systemAction), systemActions
always present on order-sign, EHR text that cannot become a link, and the policy page."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from starlette.testclient import TestClient

from cds_service.engine.decision import Evidence
from cds_service.hooks.cards import by_resource
from cds_service.hooks.service import CoverageService

from .crd_profile import coverage_extensions
from .support import FIXTURES, coverage_extension, hook_request, load, run, scenario_request

TEMP_CARD_TYPE = "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp"
NO_TRIAL = load(FIXTURES / "scenarios/mp442-chronic-pain-no-trial.json")
KETAMINE = load(FIXTURES / "scenarios/mp446-ketamine-iv-chronic-pain.json")
WALKER = {"resourceType": "DeviceRequest", "id": "w", "status": "draft", "intent": "order",
          "codeCodeableConcept": {"coding": [{"system": "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
                                              "code": "E0130"}]}, "subject": {"reference": "Patient/p1"},
              "authoredOn": "2026-06-01", "requester": {"reference": "Practitioner/dr1"}}


def for_order(cards: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    return [c for c in cards if c["extension"]["davinci-crd.associated-resource"][0]["reference"] == reference]


@pytest.mark.parametrize("hook", ["order-sign", "order-select"])
def test_conditional_order_gets_one_instructions_card(service: CoverageService, hook: str) -> None:
    """Something must be documented: one card for the order (the sandbox shows one per order), of the CRD
    Instructions type (no links, no suggestions), with the clear summary, what to document item by item,
    and the policy named in its text."""
    scenario = copy.deepcopy(NO_TRIAL)
    scenario["hook"] = hook
    scenario["selections"] = ["ServiceRequest/pump"]
    result = run(service, scenario_request(scenario))
    [card] = for_order(result.response["cards"], "ServiceRequest/pump")
    assert card["summary"].startswith("Conditional: ") and "(MP-442)" in card["summary"]
    assert len(card["summary"]) < 140
    assert "links" not in card and "suggestions" not in card
    todo = card["detail"].split("**MP-442")[0]
    assert todo.count("\n- ") == len(result.decisions[0].missing)
    assert "[MP-442 Implantable Infusion Pump for Pain and Spasticity](https://cds.example.org/policies/MP-442)" \
        in card["detail"]
    assert card["source"] == {"label": "Test Health Plan", "topic": {
        "system": TEMP_CARD_TYPE, "code": "coverage-info", "display": "Coverage Information"}}
    assert re.fullmatch(r"[0-9a-f-]{36}", card["uuid"])
    assert ("by the time the order is signed" in card["detail"]) is (hook == "order-select")
    # and the coverage information is a systemAction, never a card (on order-sign for every order)
    actions = {a["resource"]["id"]: a for a in result.response.get("systemActions", [])}
    assert set(actions) == ({"pump"} if hook == "order-select" else {o["id"] for o in scenario["orders"]})
    assert coverage_extensions(actions["pump"]["resource"])


def test_firm_decision_gets_only_the_external_reference_card(service: CoverageService) -> None:
    result = run(service, scenario_request(KETAMINE))
    [card] = result.response["cards"]
    assert card["summary"].startswith("Not covered") and card["links"][0]["type"] == "absolute"
    assert len(result.response["systemActions"]) == 1


def test_order_sign_always_has_system_actions(service: CoverageService) -> None:
    """CRD hook-16: on a primary hook every order carries coverage information, also one no policy of this
    service assesses (said as such); order-select is a secondary hook: nothing for it."""
    answer = run(service, hook_request([WALKER], prefetch={})).response
    assert answer["cards"] == [] and [a["resource"]["id"] for a in answer["systemActions"]] == ["w"]
    [info] = coverage_extensions(answer["systemActions"][0]["resource"])
    parts = {p["url"]: p for p in info["extension"]}
    assert parts["covered"]["valueCode"] == "conditional" and parts["info-needed"]["valueCode"] == "OTH"
    assert "doc-needed" not in parts and "Not assessed" in parts["reason"]["valueCodeableConcept"]["text"]
    select = hook_request([WALKER], prefetch={}, hook="order-select")
    assert run(service, select).response == {"cards": []}


def test_ehr_text_cannot_become_a_link(service: CoverageService) -> None:
    """Issue 15 item 11: bare URLs, www. names and e-mail addresses in EHR text stay text in the card
    (GFM autolink literals and markdown-it linkify with fuzzy links would make links of them)."""
    scenario = copy.deepcopy(KETAMINE)
    hostile = "see www.evil.example or https://evil.example/x, mail help@evil.example, evil.example/login"
    order = scenario["orders"][0]
    order["medicationCodeableConcept"]["coding"][0]["display"] = hostile
    order["reasonCode"][0]["text"] = hostile
    detail = run(service, scenario_request(scenario)).response["cards"][0]["detail"]
    assert "evil" in detail
    unescaped = re.compile(r"(?<!\\)\.\w|(?<!\\)[:@]")  # a dot inside a name, a scheme's colon, an @
    for found in re.finditer(r"\S*evil\S*", detail):
        assert not unescaped.search(found.group()), found.group()


def test_ehr_text_is_clipped_so_a_card_stays_small(service: CoverageService) -> None:
    scenario = copy.deepcopy(KETAMINE)
    scenario["orders"][0]["reasonCode"][0]["text"] = "x" * 100_000
    card = run(service, scenario_request(scenario)).response["cards"][0]
    assert len(card["detail"]) < 8000


def test_policy_page_is_clean_html(client: TestClient) -> None:
    response = client.get("/policies/MP-446")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    page = response.text
    assert "<title>MP-446: Intravenous Anesthetics" in page
    assert "<h1>Intravenous Anesthetics for the Treatment of Chronic Pain and Psychiatric Disorders</h1>" in page
    assert "Policy Number: MP-446" in page and "<h2>POLICY</h2>" in page
    assert "Category Filter" not in page and "Asset Publisher" not in page  # scraped site navigation
    assert "<script" not in page
    assert client.get("/policies/MP-999").status_code == 404


def test_unknown_coverage_asks_to_record_the_insurance(service: CoverageService) -> None:
    body = scenario_request(KETAMINE)
    body["prefetch"]["coverage"] = None
    reference, instructions = run(service, body).response["cards"]
    assert reference["summary"].startswith("Not covered") and reference["links"]
    assert "links" not in instructions and instructions["summary"].startswith("Record the patient's insurance")
    assert "No Coverage of the patient was found" in instructions["detail"]


def test_unreadable_data_says_what_and_to_ask_again(service: CoverageService) -> None:
    import httpx
    import respx

    body = scenario_request(load(FIXTURES / "scenarios/mp442-chronic-pain-successful-trial.json"))
    del body["prefetch"]["observations"]
    body.update(fhirServer="https://ehr.example.org/fhir",
                fhirAuthorization={"access_token": "t", "token_type": "Bearer"})
    with respx.mock(assert_all_called=False) as router:
        router.get(url__startswith="https://ehr.example.org/fhir/").mock(return_value=httpx.Response(500))
        reference, instructions = run(service, body).response["cards"]
    assert reference["summary"].startswith("Coverage not determined") and reference["links"]
    assert instructions["summary"].startswith("Ask again when the EHR's data can be read")
    assert "links" not in instructions
    assert "Observation data could not be read" in instructions["detail"].replace("\\", "")
    assert "Nothing needs to be documented" in instructions["detail"]


def test_facts_read_from_free_text_are_said_on_the_card(service: CoverageService) -> None:
    scenario = load(FIXTURES / "scenarios/mp446-route-only-in-dosage-text.json")
    result = run(service, scenario_request(scenario))
    decision = next(d for d in result.decisions if d.text_read)
    card = for_order(result.response["cards"], decision.order_reference)[0]
    assert "Read from free text, not codes" in card["detail"]


def test_an_order_that_is_not_a_crd_order_gets_no_not_assessed_information(service: CoverageService) -> None:
    """An ungoverned order without an element its CRD profile requires (a MedicationRequest without
    authoredOn) could only be returned non-conformant (resp-37: nothing but the extension may change): it
    gets no coverage information; with the element it does."""
    drug = {"resourceType": "MedicationRequest", "id": "m", "status": "draft", "intent": "order",
            "medicationCodeableConcept": {"text": "amoxicillin 500 mg"}, "subject": {"reference": "Patient/p1"},
            "requester": {"reference": "Practitioner/dr1"}}
    assert run(service, hook_request([drug], prefetch={})).response["systemActions"] == []
    drug["authoredOn"] = "2026-06-01"
    [action] = run(service, hook_request([drug], prefetch={})).response["systemActions"]
    assert action["resource"] == {**drug, "extension": action["resource"]["extension"]}


def test_the_result_names_each_card_with_its_decision_and_coverage_assertion(service: CoverageService) -> None:
    """What the audit keeps of the cards comes from the service, not from reading the response back: every
    card sent, the decision behind it, and the coverage-assertion-id of its order's coverage information."""
    body = scenario_request(NO_TRIAL)
    body["context"]["draftOrders"]["entry"].append({"resource": scenario_request(KETAMINE)["context"]["draftOrders"]
                                                    ["entry"][0]["resource"]})
    result = run(service, body)
    assert [c.card for c in result.cards] == result.response["cards"] and len(result.cards) >= 2
    assertions = {a["resource"]["resourceType"] + "/" + a["resource"]["id"]:
                  coverage_extension(a["resource"])["coverage-assertion-id"]["valueString"]
                  for a in result.response["systemActions"]}
    for issued in result.cards:
        reference = issued.card["extension"]["davinci-crd.associated-resource"][0]["reference"]
        assert issued.decision.order_reference == reference and issued.decision in result.decisions
        assert issued.assertion_id == assertions[reference]
    assert {c.decision.policy_id for c in result.cards} == {"MP-442", "MP-446"}


def test_a_card_gives_one_evidence_line_per_resource_without_repeating_a_finding() -> None:
    evidence = [
        Evidence("MedicationRequest/drug", "the pump drug 'morphine 10 MG/ML' is preservative-free morphine, "
                                           "FDA approved by the intrathecal route for chronic pain"),
        Evidence("Observation/base", "pain score 8 (72514-3) on 2026-04-30: severe (at least 7 of 10)"),
        Evidence("MedicationRequest/drug", "pump drug 'morphine 10 MG/ML' by the intrathecal route"),
        Evidence("Observation/base", "baseline pain score 8 (72514-3)"),
        Evidence("Observation/base", "baseline pain score 8 (72514-3)"),
    ]
    assert by_resource(evidence) == [
        Evidence("MedicationRequest/drug", evidence[0].finding),
        Evidence("Observation/base", f"{evidence[1].finding}; baseline pain score 8 (72514-3)"),
    ]
