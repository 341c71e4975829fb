"""Draft orders reduced to the facts the policies look at: code, drug and ingredients, route, reasons.

Facts are read from the order JSON as sent by the EHR (a single object where R4 has a list is read as a
list of one), so that orders no policy governs are never validated. A MedicationRequest's drug is its
``medicationCodeableConcept`` or the Medication its ``medicationReference`` points to: contained (``#id``),
in the draftOrders Bundle (by ``fullUrl``, ``urn:uuid:`` included, or by type and id), or among the
Medications the EHR sent in the prefetch or the service read from its FHIR server (:class:`Medications`).
A reference none of them resolves is kept, so that a decision can ask to confirm the drug.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..terminology import CodeSystems, Concept
from .dates import as_utc

ORDER_TYPES = frozenset(
    {"MedicationRequest", "ServiceRequest", "DeviceRequest", "NutritionOrder", "VisionPrescription",
     "CommunicationRequest", "SupplyRequest"}
)


def as_list(value: Any) -> list[Any]:
    """A FHIR list element as a list: one object where R4 has a list is read as a list of one."""
    if isinstance(value, list):
        return value
    return [value] if value is not None else []


def reference_text(value: Any) -> str | None:
    if isinstance(value, Mapping) and isinstance(value.get("reference"), str):
        return str(value["reference"])
    return None


class Medications:
    """Medication resources a medicationReference may point to, by every name they can be referenced by:
    ``fullUrl`` (``urn:uuid:...`` or absolute), ``Medication/id`` and the absolute URL's tail."""

    def __init__(self) -> None:
        self._by_key: dict[str, Mapping[str, Any]] = {}

    def add(self, resource: Any, full_url: Any = None) -> None:
        if not isinstance(resource, Mapping) or resource.get("resourceType") != "Medication":
            return
        rid = resource.get("id")
        if isinstance(rid, str) and rid:
            self._by_key.setdefault(f"Medication/{rid}", resource)
        if isinstance(full_url, str) and full_url:
            self._by_key.setdefault(full_url, resource)

    def add_bundle(self, bundle: Any) -> None:
        """Every Medication in a Bundle (or a lone resource), with its ``fullUrl``."""
        if not isinstance(bundle, Mapping):
            return
        if bundle.get("resourceType") != "Bundle":
            self.add(bundle)
            return
        for entry in as_list(bundle.get("entry")):
            if isinstance(entry, Mapping):
                resource = entry.get("resource")
                if isinstance(resource, Mapping) and resource.get("resourceType") == "Bundle":
                    self.add_bundle(resource)
                else:
                    self.add(resource, entry.get("fullUrl"))

    def resolve(self, reference: str) -> Mapping[str, Any] | None:
        found = self._by_key.get(reference)
        if found is not None:
            return found
        parts = reference.rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2] == "Medication":
            return self._by_key.get(f"Medication/{parts[-1]}")
        return None


def find_medication(reference: str | None, resource: Mapping[str, Any],
                    medications: Medications | None) -> Mapping[str, Any] | None:
    """The Medication a medicationReference points to: contained, or known to ``medications``."""
    if not reference:
        return None
    if reference.startswith("#"):
        for contained in as_list(resource.get("contained")):
            if isinstance(contained, Mapping) and contained.get("id") == reference[1:] \
                    and contained.get("resourceType") == "Medication":
                return contained
        return None
    return medications.resolve(reference) if medications is not None else None


@dataclass
class DrugFacts:
    """The drug of a medication resource: its code(s), its ingredients, and whether it is compounded."""

    code: Concept
    ingredients: list[Concept] = field(default_factory=list)
    form: Concept | None = None
    compounded_hint: str | None = None
    unresolved_reference: str | None = None

    @property
    def concepts(self) -> list[Concept]:
        return [c for c in (self.code, *self.ingredients) if c.codings or c.text]

    @property
    def identified(self) -> bool:
        return bool(self.concepts)


_COMPOUNDED_WORDS = ("compound",)


def drug_facts(systems: CodeSystems, resource: Mapping[str, Any], medications: Medications | None) -> DrugFacts:
    """The drug of a MedicationRequest/Statement/Administration given as JSON."""
    code = systems.concept(resource.get("medicationCodeableConcept"))
    reference = reference_text(resource.get("medicationReference"))
    medication = find_medication(reference, resource, medications)
    facts = DrugFacts(code)
    if medication is not None:
        facts.code = Concept.merge([code, systems.concept(medication.get("code"))])
        for ingredient in as_list(medication.get("ingredient")):
            if isinstance(ingredient, Mapping):
                concept = systems.concept(ingredient.get("itemCodeableConcept"))
                if not concept.codings and not concept.text:
                    concept = Concept(codings=(), text=reference_text(ingredient.get("itemReference")))
                facts.ingredients.append(concept)
        form = systems.concept(medication.get("form"))
        facts.form = form if (form.text or form.codings) else None
    elif reference:
        facts.unresolved_reference = reference
    texts = [facts.code.text, *(c.display for c in facts.code.codings), *(i.text for i in facts.ingredients)]
    if facts.form is not None:
        texts += [facts.form.text, *(c.display for c in facts.form.codings)]
    facts.compounded_hint = next((t for t in texts if t and any(w in t.lower() for w in _COMPOUNDED_WORDS)), None)
    return facts


@dataclass
class OrderFacts:
    """What the policies read of one draft order."""

    resource_type: str
    id: str | None
    raw: Mapping[str, Any]
    code: Concept
    drug: DrugFacts | None = None
    routes: list[Concept] = field(default_factory=list)
    route_texts: list[str] = field(default_factory=list)
    details: list[Concept] = field(default_factory=list)
    reasons: list[Concept] = field(default_factory=list)
    reason_references: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    related_references: list[str] = field(default_factory=list)
    insurance: list[str] = field(default_factory=list)
    authored: dt.datetime | None = None
    #: elements read leniently (one object where R4 has a list), for the decision trace
    lenient: list[str] = field(default_factory=list)

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.id}" if self.id else f"{self.resource_type}/(no id)"

    @property
    def ingredients(self) -> list[Concept]:
        return self.drug.ingredients if self.drug is not None else []

    @property
    def compounded_hint(self) -> str | None:
        return self.drug.compounded_hint if self.drug is not None else None

    def matches_reference(self, reference: str) -> bool:
        if not self.id:
            return False
        return reference == self.reference or reference.endswith("/" + self.reference)

    def concepts(self) -> list[Concept]:
        """The order code, and for a drug order the drug's codes and ingredients."""
        if self.drug is not None:
            return self.drug.concepts or [self.code]
        return [self.code]


_LIST_ELEMENTS = ("reasonCode", "reasonReference", "dosageInstruction", "bodySite", "orderDetail", "parameter",
                  "basedOn", "supportingInfo", "insurance", "note", "category", "contained")


def order_facts(systems: CodeSystems, raw: Mapping[str, Any], medications: Medications | None = None) -> OrderFacts:
    rtype = str(raw.get("resourceType"))
    rid = raw.get("id") if isinstance(raw.get("id"), str) else None
    lenient = [k for k in _LIST_ELEMENTS if isinstance(raw.get(k), Mapping)]
    facts = OrderFacts(resource_type=rtype, id=rid, raw=raw, code=Concept(codings=()), lenient=lenient)
    if rtype == "MedicationRequest":
        facts.drug = drug_facts(systems, raw, medications)
        facts.code = facts.drug.code
        for dosage in as_list(raw.get("dosageInstruction")):
            if not isinstance(dosage, Mapping):
                continue
            route = systems.concept(dosage.get("route"))
            if route.codings or route.text:
                facts.routes.append(route)
            for key in ("text", "patientInstruction"):
                if isinstance(dosage.get(key), str):
                    facts.route_texts.append(dosage[key])
            method = systems.concept(dosage.get("method"))
            if method.codings or method.text:
                facts.details.append(method)
        if facts.drug.form is not None:
            facts.details.append(facts.drug.form)
    elif rtype == "DeviceRequest":
        facts.code = systems.concept(raw.get("codeCodeableConcept"))
        for parameter in as_list(raw.get("parameter")):
            if isinstance(parameter, Mapping):
                facts.details.append(systems.concept(parameter.get("valueCodeableConcept")))
    else:
        facts.code = systems.concept(raw.get("code"))
        facts.details.extend(systems.concept(d) for d in as_list(raw.get("orderDetail")))
        facts.routes.extend(systems.concept(b) for b in as_list(raw.get("bodySite")))
        if isinstance(raw.get("patientInstruction"), str):
            facts.route_texts.append(raw["patientInstruction"])
    facts.details = [d for d in facts.details if d.codings or d.text]
    facts.routes = [r for r in facts.routes if r.codings or r.text]
    reasons = [systems.concept(r) for r in as_list(raw.get("reasonCode"))]
    facts.reasons = [r for r in reasons if r.codings or r.text]
    facts.reason_references = [r for r in (reference_text(x) for x in as_list(raw.get("reasonReference"))) if r]
    facts.notes = [n["text"] for n in as_list(raw.get("note"))
                   if isinstance(n, Mapping) and isinstance(n.get("text"), str)]
    facts.related_references = [
        r for key in ("basedOn", "supportingInfo", "partOf") for r in (reference_text(x) for x in as_list(raw.get(key)))
        if r
    ]
    facts.insurance = [r for r in (reference_text(x) for x in as_list(raw.get("insurance"))) if r]
    facts.authored = as_utc(raw.get("authoredOn"))
    return facts


def medications_from(values: Iterable[Any]) -> Medications:
    """A :class:`Medications` index of every Medication in the given Bundles or resources."""
    index = Medications()
    for value in values:
        index.add_bundle(value)
    return index
