"""The Da Vinci CRD ``ext-coverage-information`` extension and the systemAction that carries it."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from ..engine.decision import Decision, Outcome

EXT_COVERAGE_INFORMATION = "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"
NULL_FLAVOR = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor"

#: the ``coverage`` sub-extension is required (1..1); when neither the order (``insurance``) nor the
#: record names a Coverage, it says so in a reference without a target
UNKNOWN_COVERAGE: Mapping[str, str] = {
    "type": "Coverage",
    "display": "no Coverage of the patient was found in the order, the prefetch or the EHR's FHIR server",
}
#: the reason for data that could not be read: CRD 2.0.1's coverageAssertionReasons (extensible) has no
#: code for it, so the NullFlavor "temporarily unavailable"; the text says what could not be read
TECHNICAL_REASON: Mapping[str, str] = {"system": NULL_FLAVOR, "code": "NAV", "display": "temporarily unavailable"}


def coverage_information(
    decision: Decision,
    *,
    assertion_id: str,
    date: str,
    coverage: Mapping[str, Any],
    billing_code: Mapping[str, str] | None,
    prior_authorization: str,
    advisory_only: bool,
) -> dict[str, Any]:
    """The extension for one decision. ``coverage`` is the Reference to the patient's Coverage (or
    :data:`UNKNOWN_COVERAGE`). CRD invariants: not-covered carries no pa-needed; conditional carries
    info-needed (OTH, explained by reason). On order-select (``advisory_only``) no documentation is
    requested."""
    covered = decision.outcome.value
    parts: list[dict[str, Any]] = [{"url": "coverage", "valueReference": dict(coverage)},
                                   {"url": "covered", "valueCode": covered}]
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
        reason["coding"] = [dict(TECHNICAL_REASON)]
    parts.append({"url": "reason", "valueCodeableConcept": reason})
    parts.append({"url": "date", "valueDate": date})
    parts.append({"url": "coverage-assertion-id", "valueString": assertion_id})
    return {"url": EXT_COVERAGE_INFORMATION, "extension": parts}


def annotated_order(order: Mapping[str, Any], extension: Mapping[str, Any]) -> dict[str, Any]:
    """The order as the EHR sent it, with the coverage-information extension added. A new top-level
    object and extension list; the rest is shared with the request, which nothing modifies."""
    own = order.get("extension")
    updated = dict(order)
    updated["extension"] = [*(own if isinstance(own, list) else [] if own is None else [own]), dict(extension)]
    return updated


def new_assertion_id() -> str:
    return str(uuid.uuid4())
