"""Decisions on whole Synthea records (SNOMED-coded problem lists, RxNorm medications, hundreds of resources),
sent as the prefetch, for orders that carry no reason: the indication comes from the problem list."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cds_service.hooks.service import CoverageService

from .support import FIXTURES, hook_request, load

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
PUMP = {"resourceType": "ServiceRequest", "id": "pump", "status": "draft", "intent": "order",
        "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "62362"}]},
        "subject": {"reference": "Patient/p1"}, "authoredOn": "2026-06-01"}
PUMP_DRUG = {"resourceType": "MedicationRequest", "id": "pumpdrug", "status": "draft", "intent": "order",
             "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "1731998",
                                                       "display": "20 ML morphine sulfate 10 MG/ML Injection"}]},
             "subject": {"reference": "Patient/p1"},
             "dosageInstruction": [{"route": {"coding": [{"system": "http://snomed.info/sct", "code": "72607000"}]}}]}
KETAMINE = {"resourceType": "MedicationRequest", "id": "ket", "status": "draft", "intent": "order",
            "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "238083"}]},
            "subject": {"reference": "Patient/p1"},
            "dosageInstruction": [{"route": {"coding": [{"system": "http://snomed.info/sct", "code": "47625008"}]}}]}


def decide(service: CoverageService, record_file: str, orders: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    bundle = load(FIXTURES / "records" / record_file)
    record = [e["resource"] for e in bundle["entry"]]
    body = hook_request(orders, record)
    body["context"]["patientId"] = next(r["id"] for r in record if r["resourceType"] == "Patient")
    result = asyncio.run(service.handle("coverage-requirements-order-sign", body, "https://cds.example.org"))
    return {d.order_reference: (d.outcome.value, d.rule_id) for d in result.decisions}


@pytest.mark.parametrize(("record_file", "orders", "expected"), [
    # chronic pain (82423001) and chronic intractable migraine on the problem list: a pump would be decided
    # differently for each (a trial is needed / headache is excluded): the answer asks which
    ("synthea-bradly-douglas-chronic-pain-migraine.json", [PUMP, PUMP_DRUG],
     {"ServiceRequest/pump": ("conditional", "indication-ambiguous")}),
    # for IV ketamine both are chronic pain (chronic daily headache included): investigational either way
    ("synthea-bradly-douglas-chronic-pain-migraine.json", [KETAMINE],
     {"MedicationRequest/ket": ("not-covered", "chronic-pain")}),
    ("synthea-milan-beatty-mdd.json", [KETAMINE], {"MedicationRequest/ket": ("not-covered", "psychiatric-disorders")}),
    # major depression is no indication for a pump: nothing recognised, so the indication is asked for
    ("synthea-milan-beatty-mdd.json", [PUMP, PUMP_DRUG],
     {"ServiceRequest/pump": ("conditional", "indication-missing")}),
])
def test_whole_synthea_records(service: CoverageService, record_file: str, orders: list[dict[str, Any]],
                               expected: dict[str, tuple[str, str]]) -> None:
    assert decide(service, record_file, orders) == expected
