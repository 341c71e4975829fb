"""Issue 16: the record's resources are checked where a decision reads them, element by element, with the FHIR
R4 definitions. A malformed element a criterion reads: the resource is skipped and named in the trace. A
malformed element no criterion reads: no effect. Checked elements read as fhir.resources reads them."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class
from pydantic import BaseModel

from cds_service.engine.context import DECISION_CHECKS, DECISION_ELEMENTS
from cds_service.engine.decision import Decision
from cds_service.fhir.elements import Checked, ElementChecks, ElementFault, UncheckedElement
from cds_service.fhir.record import PatientRecord
from cds_service.hooks.service import CoverageService

from .support import FIXTURES, SCENARIOS, SERVICE_FOR_HOOK, load, scenario_request

Mutation = Callable[[dict[str, Any]], None]


def decide(service: CoverageService, scenario: dict[str, Any]) -> Decision:
    body = scenario_request(scenario)
    result = asyncio.run(service.handle(SERVICE_FOR_HOOK[body["hook"]], body, "https://cds.example.org"))
    expected = scenario["expect"][0]
    return next(d for d in result.decisions if d.order_reference == expected["order"])


def mutated(name: str, reference: str, mutation: Mutation) -> dict[str, Any]:
    scenario: dict[str, Any] = copy.deepcopy(load(FIXTURES / "scenarios" / f"{name}.json"))
    resource = next(r for r in scenario["record"] if f"{r['resourceType']}/{r['id']}" == reference)
    mutation(resource)
    return scenario


def setter(path: str, value: Any) -> Mutation:
    """Set an element by a dotted path (list items by index)."""
    def apply(resource: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = resource
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        node[int(last) if last.isdigit() else last] = value
    return apply


#: (scenario, resource the decision rests on, a fault in an element a criterion reads, the path named)
READ_FAULTS = [
    ("mp442-chronic-pain-successful-trial", "Procedure/trial", setter("performedDateTime", "2026-13-01"),
     "performedDateTime"),
    ("mp442-chronic-pain-successful-trial", "Procedure/trial", setter("code.coding.0.code", " 406188003"),
     "code.coding.0.code"),
    ("mp442-chronic-pain-successful-trial", "Observation/pain-after",
     setter("effectiveDateTime", "2026-05-02T10:00:00"), "effectiveDateTime"),
    ("mp442-cancer-pain-active-malignancy", "Condition/c1", setter("code", [{"text": "cancer"}]), "code"),
    ("mp442-cancer-pain-active-malignancy", "Condition/c1", setter("clinicalStatus.coding.0.version", 2),
     "clinicalStatus.coding.0.version"),
    ("mp442-baclofen-allergy-with-reaction", "AllergyIntolerance/al1",
     setter("reaction.0.manifestation", {"text": "somnolence"}), "reaction.0.manifestation"),
    ("mp442-baclofen-history-medicationrequest-stopped", "MedicationRequest/bac-hx",
     setter("statusReason.coding.0.colour", "red"), "statusReason.coding.0.colour"),
    ("mp442-baclofen-administration-stopped", "MedicationAdministration/bac-adm",
     setter("effectivePeriod", {"start": "2025-03-01T08:00:00Z"}), "effective[x]"),
    ("mp442-baclofen-administration-stopped", "MedicationAdministration/bac-adm",
     setter("medicationCodeableConcept.coding", {"code": "197391"}), "medicationCodeableConcept.coding"),
]

#: faults in elements no criterion reads
UNREAD_FAULTS: list[tuple[str, str, Mutation]] = [
    ("mp442-chronic-pain-successful-trial", "Procedure/trial", setter("subject", "not a reference")),
    ("mp442-chronic-pain-successful-trial", "Procedure/trial", setter("text", {"status": "generated"})),
    ("mp442-chronic-pain-successful-trial", "Observation/pain-after", setter("category", {"text": "survey"})),
    ("mp442-chronic-pain-successful-trial", "Observation/pain-base", setter("unknownElement", 1)),
    ("mp442-cancer-pain-active-malignancy", "Condition/c1", setter("subject", {"reference": 5})),
    ("mp442-cancer-pain-active-malignancy", "Condition/c1", setter("extension", [{"valueString": "no url"}])),
    ("mp442-baclofen-allergy-with-reaction", "AllergyIntolerance/al1", setter("type", "not-a-code ")),
    ("mp442-baclofen-history-medicationrequest-stopped", "MedicationRequest/bac-hx", setter("intent", None)),
    ("mp442-baclofen-administration-stopped", "MedicationAdministration/bac-adm",
     setter("subject", {"reference": "Patient/p1", "colour": "red"})),
]


@pytest.mark.parametrize(("name", "reference", "mutation", "path"), READ_FAULTS,
                         ids=[f"{r[1]}-{r[3]}" for r in READ_FAULTS])
def test_a_malformed_element_a_criterion_reads_skips_the_resource_and_names_it(
        service: CoverageService, name: str, reference: str, mutation: Mutation, path: str) -> None:
    expected = load(FIXTURES / "scenarios" / f"{name}.json")["expect"][0]
    decision = decide(service, mutated(name, reference, mutation))
    assert any(s.startswith(f"{reference}: {path}") for s in decision.skipped_resources), decision.skipped_resources
    assert reference not in {e.reference for e in decision.evidence}
    assert (decision.outcome.value, decision.rule_id) != (expected["outcome"], expected["rule"])


@pytest.mark.parametrize(("name", "reference", "mutation"), UNREAD_FAULTS,
                         ids=[f"{r[1]}-{i}" for i, r in enumerate(UNREAD_FAULTS)])
def test_a_malformed_element_no_criterion_reads_has_no_effect(
        service: CoverageService, name: str, reference: str, mutation: Mutation) -> None:
    scenario = mutated(name, reference, mutation)
    resource = next(r for r in scenario["record"] if f"{r['resourceType']}/{r['id']}" == reference)
    with pytest.raises(ValueError):  # whole, it is not valid FHIR R4
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    expected = scenario["expect"][0]
    decision = decide(service, scenario)
    assert decision.skipped_resources == []
    assert (decision.outcome.value, decision.rule_id) == (expected["outcome"], expected["rule"])
    assert any(reference in e.reference for e in decision.evidence) or reference not in expected.get("evidence", [])


def plain(value: Any) -> Any:
    """A checked value or a fhir.resources value as plain data, for comparing the two."""
    if isinstance(value, Checked):
        return {k: plain(v) for k, v in value._values.items()}
    if isinstance(value, BaseModel):
        out = {}
        for name, info in type(value).model_fields.items():
            item = getattr(value, name)
            if item is not None and name != "fhir_comments":
                out[info.alias or name] = plain(item)
        return out
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def record_resources() -> list[dict[str, Any]]:
    found = [r for path in SCENARIOS for r in load(path)["record"]]
    for path in sorted((FIXTURES / "records").glob("*.json")):
        found += [e["resource"] for e in load(path)["entry"]]
    return [r for r in found if DECISION_CHECKS.covers(r["resourceType"])]


def test_checked_elements_read_as_fhir_resources_reads_them() -> None:
    resources = record_resources()
    assert len(resources) > 300
    for resource in resources:
        view = DECISION_CHECKS.check(resource)
        model = get_fhir_model_class(resource["resourceType"]).model_validate(resource)
        for name in DECISION_CHECKS.names(resource["resourceType"]):
            assert plain(getattr(view, name)) == plain(getattr(model, name)), (resource["id"], name)


def test_every_element_the_engine_reads_is_an_element_of_its_type() -> None:
    ElementChecks(DECISION_ELEMENTS).compile_all()
    with pytest.raises(ValueError, match="no element 'onsetDate'"):
        ElementChecks({"Condition": ("onsetDate",)}).compile_all()


CONDITION = {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"},
             "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "G89.29"}]},
             "onsetDateTime": "2024-01-10"}


@pytest.mark.parametrize(("change", "fault"), [
    ({"code": [{"text": "x"}]}, "code: expected an object"),
    ({"note": {"text": "x"}}, "note: expected a list"),
    ({"note": [None]}, "note.0: null in a list"),
    ({"note": [{"authorString": "dr"}]}, "note.0.text: required"),
    ({"onsetPeriod": {"start": "2024-01-01"}}, "onset[x]: only one of"),
    ({"onsetDateTime": "2024-01-10T10:00:00"}, "onsetDateTime:"),  # a time needs a time zone
    ({"recordedDate": "yesterday"}, "recordedDate:"),
    ({"code": {"coding": [{"code": "G89.29", "system": "urn:x", "userSelected": "maybe"}]}},
     "code.coding.0.userSelected:"),
    ({"severity": {"text": ""}}, "severity.text:"),
    ({"id": "not an id"}, "id:"),
])
def test_a_checked_element_follows_the_fhir_definition(change: dict[str, Any], fault: str) -> None:
    with pytest.raises(ElementFault) as error:
        DECISION_CHECKS.check({**CONDITION, **change})
    assert str(error.value).startswith(fault), str(error.value)


def test_required_elements_are_checked_when_read() -> None:
    observation = {"resourceType": "Observation", "id": "o1", "code": {"text": "pain"}, "valueInteger": 3}
    with pytest.raises(ElementFault, match=r"^status: required"):
        DECISION_CHECKS.check(observation)
    assert DECISION_CHECKS.check({**observation, "_status": {"extension": [
        {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "unknown"}]}})


def test_reading_an_element_that_was_not_checked_raises() -> None:
    view = DECISION_CHECKS.check(CONDITION)
    assert view.code.coding[0].code == "G89.29" and view.severity is None
    with pytest.raises(UncheckedElement):
        _ = view.subject


def test_the_record_checks_each_resource_once_and_names_what_it_skips() -> None:
    record = PatientRecord(checks=DECISION_CHECKS)
    good, bad = dict(CONDITION), {**CONDITION, "id": "c2", "code": "G89.29"}
    record.add_all([good, bad], {"Condition": None})
    assert [c.id for c in record.get("Condition")] == ["c1"]
    assert record.validated(good) is record.validated(good)
    assert [(s.reference, s.reason) for s in record.skipped] == [("Condition/c2", "code: expected an object")]


def test_a_record_without_checks_validates_whole_resources_as_before() -> None:
    record = PatientRecord()
    record.add_all([{**CONDITION, "subject": "x"}], {"Condition": None})
    assert record.get("Condition") == []
    assert record.skipped[0].reason.startswith("subject")


def test_remembered_primitive_values_are_valid_ones_only_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from cds_service.fhir import elements

    monkeypatch.setattr(elements._Primitive, "SIZE", 3)
    for _ in range(2):  # a malformed value is refused every time, not remembered
        with pytest.raises(ElementFault, match="recordedDate"):
            DECISION_CHECKS.check({**CONDITION, "recordedDate": "2024-02-30"})
    for day in range(1, 20):
        view = DECISION_CHECKS.check({**CONDITION, "recordedDate": f"2024-01-{day:02d}"})
        assert str(view.recordedDate).startswith(f"2024-01-{day:02d}")
    dates = elements._type("Condition").fields["recordedDate"].adapter
    assert dates is not None and 0 < len(dates._valid) <= 3
