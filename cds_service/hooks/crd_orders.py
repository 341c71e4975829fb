"""What the CRD order profiles require of an order at its top level.

A Coverage Information systemAction returns the order changed only by the coverage-information extension
(CRD resp-37), so an order the EHR sent without an element its CRD profile requires cannot be returned
conformant. Such an order gets coverage information only when a policy decides it; for the others (CRD hook-16:
"not assessed by this service") it is left out. Source: the CRD 2.0.1 StructureDefinitions
profile-communicationrequest, -devicerequest, -medicationrequest, -nutritionorder, -servicerequest and
-visionprescription (snapshot elements with min >= 1 directly under the resource).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

REQUIRED: Mapping[str, tuple[str, ...]] = {
    "CommunicationRequest": ("basedOn", "status", "subject", "payload", "authoredOn", "requester"),
    "DeviceRequest": ("status", "intent", "code[x]", "subject", "authoredOn", "requester"),
    "MedicationRequest": ("status", "intent", "medication[x]", "subject", "authoredOn", "requester"),
    "NutritionOrder": ("status", "intent", "patient", "dateTime", "orderer"),
    "ServiceRequest": ("status", "intent", "code", "subject", "authoredOn", "requester"),
    "VisionPrescription": ("status", "created", "patient", "dateWritten", "prescriber", "lensSpecification"),
}


def _present(resource: Mapping[str, Any], element: str) -> bool:
    if element.endswith("[x]"):
        stem = element[:-3]
        return any(key.startswith(stem) and resource[key] not in (None, "", [], {}) for key in resource)
    return resource.get(element) not in (None, "", [], {})


def missing_required(resource: Mapping[str, Any]) -> list[str]:
    """The elements the resource's CRD order profile requires that it lacks (none for other types)."""
    return [e for e in REQUIRED.get(str(resource.get("resourceType")), ()) if not _present(resource, e)]
