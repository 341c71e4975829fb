"""The Da Vinci CRD ``ext-coverage-information`` extension and the systemAction that carries it."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from ..engine.decision import Decision, Outcome

EXT_COVERAGE_INFORMATION = "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"
CRD_TEMP = "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp"
NULL_FLAVOR = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor"


def coverage_information(
    decision: Decision,
    *,
    assertion_id: str,
    date: str,
    coverage_reference: str | None,
    billing_code: Mapping[str, str] | None,
    prior_authorization: str,
    advisory_only: bool,
) -> dict[str, Any]:
    """The extension for one decision. CRD invariants: not-covered carries no pa-needed; conditional
    carries info-needed (OTH, explained by reason). On order-select (``advisory_only``) no
    documentation is requested."""
    covered = decision.outcome.value
    parts: list[dict[str, Any]] = []
    if coverage_reference:
        parts.append({"url": "coverage", "valueReference": {"reference": coverage_reference}})
    parts.append({"url": "covered", "valueCode": covered})
    if decision.outcome is not Outcome.NOT_COVERED:
        pa = prior_authorization if decision.outcome is Outcome.COVERED else "conditional"
        parts.append({"url": "pa-needed", "valueCode": pa})
    if decision.outcome is Outcome.CONDITIONAL:
        if not advisory_only and not decision.technical:
            parts.append({"url": "doc-needed", "valueCode": "clinical"})
        parts.append({"url": "info-needed", "valueCode": "OTH"})
    if billing_code:
        parts.append({"url": "billingCode", "valueCoding": dict(billing_code)})
    reason: dict[str, Any] = {"text": decision.reason}
    if decision.technical:
        reason["coding"] = [{"system": CRD_TEMP, "code": "technical", "display": "Technical issue"}]
    parts.append({"url": "reason", "valueCodeableConcept": reason})
    parts.append({"url": "date", "valueDate": date})
    parts.append({"url": "coverage-assertion-id", "valueString": assertion_id})
    return {"url": EXT_COVERAGE_INFORMATION, "extension": parts}


def annotated_order(order: Mapping[str, Any], extension: Mapping[str, Any]) -> dict[str, Any]:
    """The order as the EHR sent it, with the coverage-information extension added. A new top-level
    object and extension list; the rest is shared with the request, which nothing modifies."""
    updated = dict(order)
    updated["extension"] = [*(order.get("extension") or []), dict(extension)]
    return updated


def new_assertion_id() -> str:
    return str(uuid.uuid4())
