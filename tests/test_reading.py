"""Liberal reading of draft orders: a single object where R4 has a list is read as a list (and noted in
the decision trace); a fault in an element no decision reads never fails the call; an in-scope order
whose read elements are broken gets a conditional decision that says so; 400 only for a broken CDS
Hooks shape."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from cds_service.hooks.cards import escape_markdown
from cds_service.hooks.reading import ORDER_UNREADABLE, as_r4_lists
from cds_service.hooks.service import CoverageService, HookResult

from .crd_profile import coverage_extensions, coverage_information_errors
from .support import FIXTURES, load, run, scenario_request

KETAMINE = load(FIXTURES / "scenarios/mp446-ketamine-iv-chronic-pain.json")


def ketamine(mutate: Any, hook: str = "order-sign") -> dict[str, Any]:
    scenario = copy.deepcopy(KETAMINE)
    scenario["hook"] = hook
    mutate(scenario["orders"][0])
    return scenario_request(scenario)


def only_decision(result: HookResult) -> Any:
    assert len(result.decisions) == 1, [d.explain() for d in result.decisions]
    return result.decisions[0]


def sandbox_shape(order: dict[str, Any]) -> None:
    """As the CDS Hooks sandbox sends it: category, reasonCode (and a coding) as single objects."""
    order["category"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/medicationrequest-category",
                                     "code": "outpatient"}]}
    order["reasonCode"] = order["reasonCode"][0]
    order["medicationCodeableConcept"]["coding"] = order["medicationCodeableConcept"]["coding"][0]


@pytest.mark.parametrize("hook", ["order-sign", "order-select"])
def test_single_objects_are_read_as_lists_and_noted(service: CoverageService, hook: str) -> None:
    expected = only_decision(run(service, ketamine(lambda o: None, hook)))
    body = ketamine(sandbox_shape, hook)
    sent = copy.deepcopy(body)
    result = run(service, body)
    decision = only_decision(result)
    assert (decision.outcome, decision.rule_id) == (expected.outcome, expected.rule_id)
    assert decision.outcome.value == "not-covered"
    notes = " ".join(decision.explain()["notes"])
    for element in ("category", "reasonCode", "medicationCodeableConcept.coding"):
        assert f"{element} was sent as a single object; read as a one-element list" in notes
    assert body == sent  # the request is not modified
    card = result.response["cards"][0]
    assert "single object" not in card["detail"]  # a note for the trace, not for the clinician
    resource = result.response["systemActions"][0]["resource"]
    assert isinstance(resource["category"], list) and isinstance(resource["reasonCode"], list)


def test_faults_in_elements_no_decision_reads_are_noted_not_fatal(service: CoverageService) -> None:
    def broken(order: dict[str, Any]) -> None:
        order["status"] = 12
        order["groupIdentifier"] = "not an Identifier"
        order["dosageInstruction"][0]["timing"] = {"repeat": "daily"}
        order["madeUpElement"] = True

    decision = only_decision(run(service, ketamine(broken)))
    assert decision.outcome.value == "not-covered" and decision.rule_id != ORDER_UNREADABLE
    notes = " ".join(decision.notes)
    assert "not valid FHIR R4, and not read by the decision" in notes
    assert "status" in notes and "madeUpElement" in notes


@pytest.mark.parametrize(("mutate", "named"), [
    (lambda o: o["reasonCode"][0]["coding"][0].update(system=5), "reasonCode[0].coding[0].system"),
    (lambda o: o["dosageInstruction"][0].update(route="intravenous"), "dosageInstruction[0].route"),
    (lambda o: o.update(medicationReference={"reference": "Medication/x"}), "(resource)"),
])
def test_an_order_whose_read_elements_are_broken_is_conditional(service: CoverageService, mutate: Any,
                                                                named: str) -> None:
    result = run(service, ketamine(mutate))
    decision = only_decision(result)
    assert decision.outcome.value == "conditional" and decision.rule_id == ORDER_UNREADABLE
    assert named in decision.reason and "could not be read" in decision.reason
    ext = coverage_extensions(result.response["systemActions"][0]["resource"])[0]
    assert coverage_information_errors(ext, "2.0.1") == []
    assert {p["url"]: p for p in ext["extension"]}["covered"]["valueCode"] == "conditional"
    [card] = result.response["cards"]  # one card per order: Instructions (no links), saying what to fix
    assert card["summary"].startswith("Conditional: the order could not be read") and "links" not in card
    assert escape_markdown(decision.missing[0]) in card["detail"]


def test_shape_of_the_cds_hooks_request_is_still_a_400(service: CoverageService) -> None:
    from cds_service.hooks.request import RequestError

    body = ketamine(lambda o: None)
    body["context"]["draftOrders"] = [body["context"]["draftOrders"]]
    with pytest.raises(RequestError, match="must be a FHIR Bundle") as raised:
        run(service, body)
    assert raised.value.status == 400


def test_single_entry_and_string_selection_are_read_as_lists(service: CoverageService) -> None:
    body = ketamine(lambda o: None, "order-select")
    body["context"]["draftOrders"]["entry"] = body["context"]["draftOrders"]["entry"][0]
    body["context"]["selections"] = "MedicationRequest/ket"
    decision = only_decision(run(service, body))
    assert decision.outcome.value == "not-covered"
    assert any("entry was sent as a single object" in n for n in decision.notes)
    assert any("selections was sent as a string" in n for n in decision.notes)


def test_as_r4_lists_leaves_valid_resources_alone() -> None:
    order = KETAMINE["orders"][0]
    read, notes = as_r4_lists(order)
    assert read is order and notes == []
    contained: dict[str, Any] = {"resourceType": "MedicationRequest", "contained": [
        {"resourceType": "Medication", "id": "m", "ingredient": {"itemCodeableConcept": {"text": "ketamine"}}}]}
    read, notes = as_r4_lists(contained)
    assert read["contained"][0]["ingredient"] == [{"itemCodeableConcept": {"text": "ketamine"}}]
    assert notes == ["contained[0].ingredient was sent as a single object; read as a one-element list "
                     "(FHIR R4 JSON has a list)"]
    assert contained["contained"][0]["ingredient"] == {"itemCodeableConcept": {"text": "ketamine"}}


@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
def test_an_order_that_names_no_drug_yet_gets_no_card(service: CoverageService, hook: str) -> None:
    """The sandbox sends a MedicationRequest with no medication while its order page opens: no drug, so no
    policy applies yet (a drug that cannot be identified is asked about; no drug at all is not)."""
    def no_drug(order: dict[str, Any]) -> None:
        del order["medicationCodeableConcept"]
        del order["dosageInstruction"]

    result = run(service, ketamine(no_drug, hook))
    assert result.decisions == [] and result.response["cards"] == []


def test_a_drug_reference_that_cannot_be_read_is_still_asked_about(service: CoverageService) -> None:
    def unreadable(order: dict[str, Any]) -> None:
        del order["medicationCodeableConcept"]
        order["medicationReference"] = {"reference": "Medication/not-here"}

    decision = only_decision(run(service, ketamine(unreadable)))
    assert (decision.outcome.value, decision.rule_id) == ("conditional", "drug-unidentified")
