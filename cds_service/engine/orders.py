"""Draft orders reduced to the facts the policies look at: code, drug and ingredients, route, reasons.

Facts are read from the order JSON as sent by the EHR, so that orders no policy governs are never
validated; the hook layer validates the in-scope ones with fhir.resources before deciding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..terminology import CodeSystems, Concept

ORDER_TYPES = frozenset(
    {"MedicationRequest", "ServiceRequest", "DeviceRequest", "NutritionOrder", "VisionPrescription",
     "CommunicationRequest", "SupplyRequest"}
)


@dataclass
class OrderFacts:
    resource_type: str
    id: str | None
    raw: Mapping[str, Any]
    code: Concept
    ingredients: list[Concept] = field(default_factory=list)
    routes: list[Concept] = field(default_factory=list)
    details: list[Concept] = field(default_factory=list)
    reasons: list[Concept] = field(default_factory=list)
    reason_references: list[str] = field(default_factory=list)
    related_references: list[str] = field(default_factory=list)
    insurance: list[str] = field(default_factory=list)
    compounded_hint: str | None = None

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.id}" if self.id else f"{self.resource_type}/(no id)"

    def matches_reference(self, reference: str) -> bool:
        if not self.id:
            return False
        return reference == self.reference or reference.endswith("/" + self.reference)


def _list(value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    return [value] if value is not None else []


def _reference(value: Any) -> str | None:
    if isinstance(value, Mapping) and isinstance(value.get("reference"), str):
        return str(value["reference"])
    return None


def _find_medication(reference: str | None, order: Mapping[str, Any],
                     bundle_resources: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    if not reference:
        return None
    if reference.startswith("#"):
        for contained in _list(order.get("contained")):
            if isinstance(contained, Mapping) and contained.get("id") == reference[1:]:
                return contained
        return None
    target = reference.rstrip("/").split("/")[-1]
    for resource in bundle_resources:
        if resource.get("resourceType") == "Medication" and resource.get("id") == target:
            return resource
    return None


def order_facts(systems: CodeSystems, raw: Mapping[str, Any],
                bundle_resources: Sequence[Mapping[str, Any]] = ()) -> OrderFacts:
    rtype = str(raw.get("resourceType"))
    rid = raw.get("id") if isinstance(raw.get("id"), str) else None
    ingredients: list[Concept] = []
    routes: list[Concept] = []
    details: list[Concept] = []
    compounded_hint = None
    if rtype == "MedicationRequest":
        code = systems.concept(raw.get("medicationCodeableConcept"))
        medication = _find_medication(_reference(raw.get("medicationReference")), raw, bundle_resources)
        if medication is not None:
            code = Concept.merge([code, systems.concept(medication.get("code"))])
            for ingredient in _list(medication.get("ingredient")):
                if isinstance(ingredient, Mapping):
                    concept = systems.concept(ingredient.get("itemCodeableConcept"))
                    if not concept.codings and not concept.text:
                        ref = _reference(ingredient.get("itemReference"))
                        concept = Concept(codings=(), text=ref)
                    ingredients.append(concept)
            form = systems.concept(medication.get("form"))
            if form.text or form.codings:
                details.append(form)
        for dosage in _list(raw.get("dosageInstruction")):
            if isinstance(dosage, Mapping) and dosage.get("route") is not None:
                routes.append(systems.concept(dosage.get("route")))
        for text in (code.text, *(c.display for c in code.codings), *(i.text for i in ingredients)):
            if text and "compound" in text.lower():
                compounded_hint = text
                break
    elif rtype == "DeviceRequest":
        code = systems.concept(raw.get("codeCodeableConcept"))
        for parameter in _list(raw.get("parameter")):
            if isinstance(parameter, Mapping):
                details.append(systems.concept(parameter.get("valueCodeableConcept")))
    else:
        code = systems.concept(raw.get("code"))
        details.extend(systems.concept(d) for d in _list(raw.get("orderDetail")))
        routes.extend(systems.concept(b) for b in _list(raw.get("bodySite")))
    reasons = [systems.concept(r) for r in _list(raw.get("reasonCode"))]
    reason_refs = [r for r in (_reference(x) for x in _list(raw.get("reasonReference"))) if r]
    related = [
        r
        for key in ("basedOn", "supportingInfo", "partOf")
        for r in (_reference(x) for x in _list(raw.get(key)))
        if r
    ]
    insurance = [r for r in (_reference(x) for x in _list(raw.get("insurance"))) if r]
    return OrderFacts(
        resource_type=rtype,
        id=rid,
        raw=raw,
        code=code,
        ingredients=ingredients,
        routes=routes,
        details=[d for d in details if d.codings or d.text],
        reasons=[r for r in reasons if r.codings or r.text],
        reason_references=reason_refs,
        related_references=related,
        insurance=insurance,
        compounded_hint=compounded_hint,
    )
