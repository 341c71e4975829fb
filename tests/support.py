"""Helpers shared by the tests: fixture paths and building hook requests from scenario files."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
SCENARIOS = sorted((FIXTURES / "scenarios").glob("*.json"))
HOOK_CORPUS = sorted((FIXTURES / "hooks").glob("*.json"))

PREFETCH_KEYS = {
    "Condition": "conditions",
    "Observation": "observations",
    "Procedure": "procedures",
    "MedicationStatement": "medicationStatements",
    "MedicationRequest": "medicationRequests",
    "Device": "devices",
    "MedicationAdministration": "medicationAdministrations",
    "AllergyIntolerance": "allergies",
    "Coverage": "coverage",
    "QuestionnaireResponse": "questionnaireResponses",
}
SERVICE_FOR_HOOK = {
    "order-select": "coverage-requirements-order-select",
    "order-sign": "coverage-requirements-order-sign",
    "order-dispatch": "coverage-requirements-order-dispatch",
    "appointment-book": "coverage-requirements-appointment-book",
}


def load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def searchset(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [{"fullUrl": f"http://ehr.example/fhir/{r['resourceType']}/{r.get('id')}", "resource": r}
                  for r in resources],
    }


def prefetch_for(record: list[dict[str, Any]]) -> dict[str, Any]:
    """Every advertised prefetch key, each a searchset of the record's resources of its type."""
    out: dict[str, Any] = {key: searchset([]) for key in PREFETCH_KEYS.values()}
    for resource in record:
        if resource["resourceType"] == "Medication":  # as the medication list's _include brings it
            out["medicationRequests"]["entry"].append({"resource": resource, "search": {"mode": "include"}})
            continue
        key = PREFETCH_KEYS.get(resource["resourceType"])
        if key:
            out[key]["entry"].append({"resource": resource})
            out[key]["total"] += 1
    return out


def hook_request(orders: list[dict[str, Any]], record: list[dict[str, Any]] | None = None, *,
                 hook: str = "order-sign", selections: list[str] | None = None,
                 prefetch: dict[str, Any] | None = None, draft_extra: list[dict[str, Any]] | None = None,
                 **extra: Any) -> dict[str, Any]:
    """A hook request for ``orders`` (the draftOrders Bundle, plus ``draft_extra`` entries such as a Medication
    with its fullUrl), with every advertised prefetch key built from ``record``."""
    entries = [{"fullUrl": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, o['resourceType'] + '/' + o['id'])}",
                "resource": o} for o in orders]
    context: dict[str, Any] = {
        "userId": "Practitioner/dr1",
        "patientId": "p1",
        "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [*entries, *(draft_extra or [])]},
    }
    if hook == "order-select":
        context["selections"] = selections or [f"{orders[0]['resourceType']}/{orders[0]['id']}"]
    body: dict[str, Any] = {
        "hook": hook,
        "hookInstance": str(uuid.uuid4()),
        "context": context,
        "prefetch": prefetch if prefetch is not None else prefetch_for(record or []),
    }
    body.update(extra)
    return body


def scenario_request(scenario: dict[str, Any]) -> dict[str, Any]:
    return hook_request(scenario["orders"], scenario["record"], hook=scenario["hook"],
                        selections=scenario.get("selections"), draft_extra=scenario.get("draft_extra"))


def coverage_extension(resource: dict[str, Any]) -> dict[str, Any]:
    ext = [e for e in resource.get("extension", [])
           if e["url"] == "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"]
    assert len(ext) == 1, ext
    return {p["url"]: p for p in ext[0]["extension"]}
