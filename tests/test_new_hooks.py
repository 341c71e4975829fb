"""order-dispatch and appointment-book: the same decisions, a coverage-information systemAction per
in-scope resource (for an Appointment based on a ServiceRequest: the ServiceRequest), nothing else
changed."""

from __future__ import annotations

import copy
import uuid
from typing import Any

import httpx
import pytest
import respx

from cds_service.fhir.gather import DataUnavailable
from cds_service.hooks.service import CoverageService

from .crd_profile import CI_URL, coverage_extensions, coverage_information_errors
from .support import FIXTURES, load, prefetch_for, run, scenario_request, searchset

TRIAL = load(FIXTURES / "scenarios/mp442-chronic-pain-successful-trial.json")
PUMP = next(o for o in TRIAL["orders"] if o["resourceType"] == "ServiceRequest")
DRUG = next(o for o in TRIAL["orders"] if o["resourceType"] == "MedicationRequest")
PUMP_ONLY = {**TRIAL, "orders": [PUMP]}  # without the drug order, the pump's route is not known
FHIR = "https://ehr.example.org/fhir"


def hook_body(hook: str, context: dict[str, Any], prefetch: dict[str, Any], version: str | None = "2.2") -> Any:
    body: dict[str, Any] = {"hook": hook, "hookInstance": str(uuid.uuid4()),
                            "context": {"patientId": "p1", **context}, "prefetch": prefetch}
    if version:
        body["extension"] = {"davinci-crd.requestedVersion": version}
    return body


def dispatch(prefetch_orders: list[dict[str, Any]], refs: list[str]) -> Any:
    prefetch = prefetch_for(TRIAL["record"])
    prefetch["dispatchedServiceRequests"] = searchset([o for o in prefetch_orders
                                                       if o["resourceType"] == "ServiceRequest"])
    prefetch["dispatchedMedicationRequests"] = searchset([o for o in prefetch_orders
                                                          if o["resourceType"] == "MedicationRequest"])
    return hook_body("order-dispatch", {"dispatchedOrders": refs, "performer": "Organization/infusion-centre"},
                     prefetch)


def only_resource_changed_is_the_extension(sent: dict[str, Any], updated: dict[str, Any]) -> None:
    rest = {k: v for k, v in updated.items() if k != "extension"}
    assert rest == {k: v for k, v in sent.items() if k != "extension"}
    assert [e for e in updated["extension"] if e["url"] != CI_URL] == sent.get("extension", [])


def test_order_dispatch_decides_the_dispatched_orders(service: CoverageService) -> None:
    expected = run(service, scenario_request(TRIAL))
    result = run(service, dispatch(TRIAL["orders"], ["ServiceRequest/pump", "MedicationRequest/pumpdrug"]))
    assert [(d.order_reference, d.outcome, d.rule_id) for d in result.decisions] == [
        (d.order_reference, d.outcome, d.rule_id) for d in expected.decisions]
    assert result.decisions[0].outcome.value == "covered"
    action, drug = result.response["systemActions"]  # the drug: not assessed by this service (hook-16)
    assert drug["resource"]["id"] == "pumpdrug"
    only_resource_changed_is_the_extension(PUMP, action["resource"])
    for ext in coverage_extensions(action["resource"]):
        assert coverage_information_errors(ext, "2.2.1") == []
    assert result.request.draft_orders == [PUMP, DRUG]  # what the audit lists


def test_order_dispatch_reads_orders_missing_from_the_prefetch(service: CoverageService) -> None:
    body = dispatch([DRUG], ["http://ehr.example.org/fhir/ServiceRequest/pump", "MedicationRequest/pumpdrug"])
    body.update(fhirServer=FHIR, fhirAuthorization={"access_token": "t", "token_type": "Bearer",
                                                    "scope": "patient/ServiceRequest.rs patient/*.rs"})
    with respx.mock(assert_all_called=False) as router:
        route = router.get(f"{FHIR}/ServiceRequest?_id=pump").mock(
            return_value=httpx.Response(200, json=searchset([PUMP])))
        result = run(service, body)
    assert route.called
    assert [d.outcome.value for d in result.decisions] == ["covered"]


def test_order_dispatch_without_the_orders_is_412(service: CoverageService) -> None:
    with pytest.raises(DataUnavailable, match="ServiceRequest/pump"):
        run(service, dispatch([], ["ServiceRequest/pump"]))


def appointment(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Appointment", "id": "appt1", "status": "proposed",
            "participant": [{"actor": {"reference": "Patient/p1"}, "status": "accepted"}], **extra}


def book(appointments: list[dict[str, Any]], *orders: dict[str, Any], version: str | None = "2.2") -> Any:
    prefetch = prefetch_for(TRIAL["record"])
    prefetch["basedOnServiceRequests"] = searchset(list(orders))
    return hook_body("appointment-book", {
        "userId": "Practitioner/dr1",
        "appointments": {"resourceType": "Bundle", "type": "collection",
                         "entry": [{"resource": a} for a in appointments]}}, prefetch, version)


def test_appointment_based_on_a_service_request_updates_the_service_request(service: CoverageService) -> None:
    expected = run(service, scenario_request(PUMP_ONLY)).decisions
    booked = appointment(basedOn=[{"reference": "ServiceRequest/pump"}])
    result = run(service, book([booked], PUMP))
    assert [(d.order_reference, d.outcome, d.rule_id) for d in result.decisions] == [
        (d.order_reference, d.outcome, d.rule_id) for d in expected]
    [action] = result.response["systemActions"]
    only_resource_changed_is_the_extension(PUMP, action["resource"])
    assert action["resource"]["resourceType"] == "ServiceRequest"


def test_appointment_for_the_service_itself_updates_the_appointment(service: CoverageService) -> None:
    booked = appointment(serviceType=[{"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "62362"}]}],
                         reasonCode=copy.deepcopy(PUMP["reasonCode"]))
    [expected] = run(service, scenario_request(PUMP_ONLY)).decisions
    result = run(service, book([booked]))
    [decision] = result.decisions
    assert decision.order_reference == "Appointment/appt1"
    assert (decision.outcome, decision.rule_id, decision.missing) == (expected.outcome, expected.rule_id,
                                                                      expected.missing)
    assert "Appointment/appt1" in {e.reference for e in decision.evidence}
    [action] = result.response["systemActions"]
    only_resource_changed_is_the_extension(booked, action["resource"])
    for ext in coverage_extensions(action["resource"]):
        assert coverage_information_errors(ext, "2.2.1") == []
    card = result.response["cards"][0]
    assert card["extension"]["davinci-crd.associated-resource"] == [{"reference": "Appointment/appt1"}]


@pytest.mark.parametrize("hook", ["order-dispatch", "appointment-book"])
def test_nothing_in_scope_still_has_system_actions(service: CoverageService, hook: str) -> None:
    other = {"resourceType": "ServiceRequest", "id": "x", "status": "active", "intent": "order",
             "authoredOn": "2026-06-01", "requester": {"reference": "Practitioner/dr1"},
             "subject": {"reference": "Patient/p1"}, "code": {"coding": [{"system": "http://loinc.org",
                                                                         "code": "24323-8"}]}}
    body = dispatch([other], ["ServiceRequest/x"]) if hook == "order-dispatch" else book(
        [appointment(basedOn=[{"reference": "ServiceRequest/x"}])], other)
    answer = run(service, body).response  # hook-16: coverage information all the same, "not assessed"
    assert answer["cards"] == [] and [a["resource"]["id"] for a in answer["systemActions"]] == ["x"]
    [ext] = coverage_extensions(answer["systemActions"][0]["resource"])
    assert coverage_information_errors(ext, "2.2.1") == []
