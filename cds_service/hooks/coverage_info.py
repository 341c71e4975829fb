"""The Da Vinci CRD ``ext-coverage-information`` extension and the systemAction that carries it."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from ..engine.decision import Decision, Outcome
from .versions import CrdVersion

EXT_COVERAGE_INFORMATION = "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"

#: the ``coverage`` sub-extension is required (1..1); when neither the order (``insurance``) nor the
#: record names a Coverage, it says so in a reference without a target
UNKNOWN_COVERAGE: Mapping[str, str] = {
    "type": "Coverage",
    "display": "no Coverage of the patient was found in the order, the prefetch or the EHR's FHIR server",
}


def coverage_information(
    decision: Decision,
    *,
    version: CrdVersion,
    assertion_id: str,
    date: str,
    coverage: Mapping[str, Any],
    billing_code: Mapping[str, str] | None,
    prior_authorization: str,
    advisory_only: bool,
    policy_url: str,
    questionnaire: str | None = None,
) -> dict[str, Any]:
    """The extension for one decision, in the shape of CRD ``version``. ``coverage`` is the Reference to
    the patient's Coverage (or :data:`UNKNOWN_COVERAGE`). Invariants: not-covered carries no pa-needed;
    a conditional element carries info-needed (OTH, explained by reason); data that could not be read is
    the version's technical answer with its reason code. On order-select (``advisory_only``) no
    documentation is requested. ``questionnaire``: the version-specific canonical of the documentation form
    that collects what is missing (sent with doc-needed only, crd-ci-q1)."""
    covered = decision.outcome.value
    if decision.technical:
        covered = version.technical_covered
    codes: dict[str, str] = {"covered": covered}
    if decision.outcome is not Outcome.NOT_COVERED:
        codes["pa-needed"] = prior_authorization if decision.outcome is Outcome.COVERED else "conditional"
    if decision.outcome is Outcome.CONDITIONAL and not advisory_only and not decision.technical:
        codes["doc-needed"] = "clinical"
    parts: list[dict[str, Any]] = [{"url": "coverage", "valueReference": dict(coverage)}]
    parts += [{"url": url, "valueCode": code} for url, code in codes.items()]
    if any(codes.get(element) == "conditional" for element in version.info_needed_when):
        parts.append({"url": "info-needed", "valueCode": "OTH"})
    if questionnaire is not None and "doc-needed" in codes:
        parts.append({"url": "questionnaire", "valueCanonical": questionnaire})
    if billing_code:
        parts.append({"url": "billingCode", "valueCoding": dict(billing_code)})
    reason: dict[str, Any] = {"text": with_policy_versions(decision.reason, [decision.policy_version])}
    if decision.technical:
        reason["coding"] = [dict(version.technical_reason)]
    parts.append({"url": "reason", "valueCodeableConcept": reason})
    if version.policy_link_detail is not None:
        link = version.policy_link_detail
        parts.append({"url": "detail", "extension": [
            {"url": "category", "valueCode": link["category"]},
            {"url": "code", "valueCodeableConcept": {"coding": [
                {"system": link["system"], "code": link["code"], "display": link["display"]}]}},
            {"url": "value", "valueUrl": policy_url},
        ]})
    parts.append({"url": "date", "valueDate": date})
    parts.append({"url": "coverage-assertion-id", "valueString": assertion_id})
    return {"url": EXT_COVERAGE_INFORMATION, "extension": parts}


def not_assessed_information(*, version: CrdVersion, assertion_id: str, date: str, coverage: Mapping[str, Any],
                             reason: str, technical: bool = False) -> dict[str, Any]:
    """The extension for an order on a primary hook that no policy of this service assesses (CRD hook-16:
    every answer on a primary hook carries coverage information): the version's "not determined here"
    answer, with the reason in text and nothing asked of the clinician. ``technical``: the EHR's data (the
    patient's Coverage among it) could not be read for this call: the version's technical answer."""
    covered = version.technical_covered if technical else version.not_assessed_covered
    parts: list[dict[str, Any]] = [{"url": "coverage", "valueReference": dict(coverage)},
                                   {"url": "covered", "valueCode": covered}]
    if covered == "conditional":
        parts.append({"url": "pa-needed", "valueCode": "conditional"})  # crd-ci-q2 in 2.0.1: not not-covered
        if "covered" in version.info_needed_when:
            parts.append({"url": "info-needed", "valueCode": "OTH"})
    reason_concept: dict[str, Any] = {"text": reason}
    if technical:
        reason_concept["coding"] = [dict(version.technical_reason)]
    parts += [{"url": "reason", "valueCodeableConcept": reason_concept},
              {"url": "date", "valueDate": date},
              {"url": "coverage-assertion-id", "valueString": assertion_id}]
    return {"url": EXT_COVERAGE_INFORMATION, "extension": parts}


def with_policy_versions(reason: str, versions: Sequence[str]) -> str:
    """``reason`` followed by the version(s) of the policies it was decided under (CRD has no element for a
    policy version in either profile; the reason text is free in both, and always sent)."""
    shown = [v for v in versions if v]
    if not shown:
        return reason
    return f"{reason} Policy version{'s' if len(shown) > 1 else ''}: {', '.join(shown)}."


def annotated_order(order: Mapping[str, Any], extension: Mapping[str, Any]) -> dict[str, Any]:
    """The order as the EHR sent it, with the coverage-information extension added. A new top-level
    object and extension list; the rest is shared with the request, which nothing modifies."""
    own = order.get("extension")
    updated = dict(order)
    updated["extension"] = [*(own if isinstance(own, list) else [] if own is None else [own]), dict(extension)]
    return updated


def new_assertion_id() -> str:
    return str(uuid.uuid4())
