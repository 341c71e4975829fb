"""What a criterion can see while a policy decides one order: the order, the other draft orders,
the patient's record, the indication under consideration, and the compiled value sets."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..fhir.record import PatientRecord
from ..terminology import CodeSystems, Coding, Concept, ValueSet
from .orders import OrderFacts

INACTIVE_VERIFICATION = frozenset({"entered-in-error", "refuted"})
ACTIVE_CLINICAL = frozenset({"active", "recurrence", "relapse"})


@dataclass(frozen=True)
class Indication:
    """One candidate indication for the order, and where it came from."""

    concept: Concept
    source: str
    reference: str


@dataclass
class EvaluationContext:
    systems: CodeSystems
    value_sets: Mapping[str, ValueSet]
    order: OrderFacts
    draft_orders: Sequence[OrderFacts]
    record: PatientRecord
    indication: Indication | None
    implied_route: str | None = None

    def value_set(self, name: str) -> ValueSet:
        return self.value_sets[name]

    def concept(self, model: Any) -> Concept:
        """A :class:`Concept` from a fhir.resources CodeableConcept (or None)."""
        if model is None:
            return Concept(codings=())
        codings = []
        for coding in model.coding or []:
            if coding.code:
                short = self.systems.short_name(coding.system)
                codings.append(Coding(short or (coding.system or ""), coding.code.strip(), coding.display))
        return Concept(codings=tuple(codings), text=model.text)

    def medication_concepts(self, resource: Any) -> list[Concept]:
        """The drug of a MedicationStatement/MedicationAdministration: its code, or the referenced
        Medication's code and ingredients (contained or in the record)."""
        concepts = [self.concept(resource.medicationCodeableConcept)]
        ref = resource.medicationReference.reference if resource.medicationReference else None
        medication = None
        if ref and ref.startswith("#"):
            medication = next((c for c in resource.contained or [] if getattr(c, "id", None) == ref[1:]), None)
        elif ref:
            medication = self.record.resolve(ref)
            self.record.consulted.add("Medication")
        if medication is not None:
            concepts.append(self.concept(getattr(medication, "code", None)))
            for ingredient in getattr(medication, "ingredient", None) or []:
                concepts.append(self.concept(ingredient.itemCodeableConcept))
        return [c for c in concepts if c.codings or c.text]

    def active_conditions(self) -> Iterator[tuple[Any, Concept]]:
        """Conditions that are active: entered-in-error and refuted ones are ignored, resolved and
        inactive ones are not active. A Condition without clinicalStatus counts as active unless it
        has an abatement."""
        for condition in self.record.of_type("Condition"):
            verification = status_code(condition.verificationStatus)
            if verification in INACTIVE_VERIFICATION:
                continue
            clinical = status_code(condition.clinicalStatus)
            if clinical is None:
                if condition.abatementDateTime or condition.abatementPeriod or condition.abatementString \
                        or condition.abatementAge or condition.abatementRange:
                    continue
            elif clinical not in ACTIVE_CLINICAL:
                continue
            yield condition, self.concept(condition.code)


def status_code(concept: Any) -> str | None:
    """The first code of a status CodeableConcept (clinicalStatus, verificationStatus), or None."""
    if concept is None:
        return None
    for coding in concept.coding or []:
        if coding.code:
            return str(coding.code)
    return None


def reference_of(resource: Any) -> str:
    return f"{resource.get_resource_type()}/{resource.id}" if resource.id else f"{resource.get_resource_type()}/(no id)"


def as_utc(value: Any) -> dt.datetime | None:
    """A FHIR date/dateTime (date, naive or aware datetime, or ISO text) as an aware UTC datetime."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            try:
                value = dt.date.fromisoformat(value[:10])
            except ValueError:
                return None
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
    return None


def period_of(resource: Any, prefix: str) -> tuple[dt.datetime | None, dt.datetime | None]:
    """Start and end of ``{prefix}DateTime`` / ``{prefix}Period`` on a resource."""
    moment = as_utc(getattr(resource, f"{prefix}DateTime", None))
    if moment is not None:
        return moment, moment
    period = getattr(resource, f"{prefix}Period", None)
    if period is None:
        return None, None
    start, end = as_utc(period.start), as_utc(period.end)
    return start or end, end or start


def references(items: Sequence[Any] | None) -> list[str]:
    return [r.reference for r in items or [] if getattr(r, "reference", None)]
