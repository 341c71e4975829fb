"""What a criterion can see while a policy decides one order: the order, the other draft orders, the
patient's record, the indication under consideration, and the compiled value sets.

One :class:`DecisionScope` is shared by every candidate indication of one decision: which resource types
were consulted (a type that could not be read makes the decision non-firm only if it was consulted), results
of criteria that do not depend on the indication (computed once), and what was read from free text.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..fhir.elements import ElementChecks
from ..fhir.record import PatientRecord
from ..terminology import CodeSystems, Coding, Concept, Match, ValueSet
from .dates import as_utc
from .decision import Result
from .orders import DrugFacts, Medications, OrderFacts, drug_facts

#: What the decisions read of each resource type of the record (top-level elements; a choice element by its
#: stem), and so what is checked, element by element, before a resource counts as evidence (see
#: cds_service.fhir.elements): a resource whose element here is malformed is skipped and named in the trace; a
#: fault anywhere else is not the decision's business. Reading an element not listed raises, so this table and
#: the readers cannot drift apart. Readers: the Condition statuses, abatement and code (``conditions`` below,
#: indication.py), onset, recordedDate, severity and note (criteria/pain.py); Procedure status, code, body site,
#: note and performed (criteria/trial.py, criteria/conditions.py); Device status and type (criteria/conditions.py);
#: the pain scores' status, code, value, effective and partOf (criteria/scores.py, read from the JSON and checked
#: when chosen as evidence); the medication resources' drug (medication[x], and ``contained`` for a contained
#: Medication), status, reasons, notes, dosage and route, effective and partOf (criteria/drug_failure.py,
#: criteria/pump_drug.py, criteria/trial.py); allergies' verification status, code and reactions
#: (criteria/drug_failure.py). Coverage and Medication are read from the JSON only (orders.py, the service).
DECISION_ELEMENTS: Mapping[str, tuple[str, ...]] = {
    "Condition": ("clinicalStatus", "verificationStatus", "code", "abatement", "onset", "recordedDate", "severity",
                  "note"),
    "Procedure": ("status", "code", "bodySite", "note", "performed"),
    "Device": ("status", "type"),
    "Observation": ("status", "code", "value", "effective", "partOf"),
    "MedicationAdministration": ("status", "statusReason", "reasonCode", "note", "dosage", "effective", "partOf",
                                 "medication", "contained"),
    "MedicationRequest": ("status", "statusReason", "note", "dosageInstruction", "medication", "contained"),
    "MedicationStatement": ("status", "statusReason", "note", "dosage", "medication", "contained"),
    "AllergyIntolerance": ("verificationStatus", "code", "reaction"),
}
DECISION_CHECKS = ElementChecks(DECISION_ELEMENTS)


#: the status rules ``policies/condition-status.yaml`` defines, and the only names criteria may use
STATUS_RULES = ("current", "history")


@dataclass(frozen=True)
class StatusRule:
    """Which Conditions count for a criterion: the clinical statuses it accepts, and whether a Condition
    without a clinical status counts ("yes", or "unless-abated": only while it has no abatement)."""

    name: str
    clinical: frozenset[str]
    without_clinical_status: str


@dataclass(frozen=True)
class ConditionStatuses:
    """The status rules of ``policies/condition-status.yaml``."""

    rules: Mapping[str, StatusRule]
    never: frozenset[str]
    question: frozenset[str]

    def rule(self, name: str) -> StatusRule:
        return self.rules[name]


@dataclass(frozen=True)
class CountedCondition:
    """A Condition that counts under a status rule; ``question`` names a verification status (e.g.
    provisional) that makes it a question rather than an answer."""

    resource: Any
    concept: Concept
    reference: str
    question: str | None


@dataclass(frozen=True)
class Indication:
    """One candidate indication for the order: the coding (or text) considered, where it came from, and the
    whole source it belongs to (all codings of the Condition or reason, for evidence such as onset)."""

    concept: Concept
    source: str
    reference: str
    full: Concept
    condition: Any | None = None
    via_text: bool = False
    question: str | None = None

    def label(self) -> str:
        coding = self.concept.codings[0] if self.concept.codings else None
        name = self.concept.label()
        return f"{name} ({coding.system}|{coding.code})" if coding and name != f"{coding.system}|{coding.code}" \
            else name


@dataclass
class DecisionScope:
    """What one decision keeps while its candidate indications are tried: the resource types consulted (data
    that could not be read holds the decision only if it consulted them), results of criteria that do not
    depend on the indication, shared intermediate results, and what was read from free text. Made anew by
    every call of ``decide``: the patient record itself is only read."""

    consulted: set[str] = field(default_factory=set)
    cache: dict[int, Result] = field(default_factory=dict)
    #: shared intermediate results (e.g. the pain scores read once for several criteria)
    memo: dict[str, Any] = field(default_factory=dict)
    #: value-set matches of concepts (see EvaluationContext.find)
    found: dict[tuple[str, Concept], Match | None] = field(default_factory=dict)
    text_read: list[str] = field(default_factory=list)

    def read_text(self, what: str) -> None:
        if what not in self.text_read:
            self.text_read.append(what)


@dataclass(frozen=True)
class EvaluationContext:
    """What a criterion sees while a policy decides one order: the order and the other draft orders, the
    patient's record, the policy's value sets and the shared ones, the day of the decision, the Medications
    orders reference, the candidate indication under consideration (:meth:`with_indication`), and the decision's
    :class:`DecisionScope`. Criteria read the record through it, so that what was consulted is known."""

    systems: CodeSystems
    value_sets: Mapping[str, ValueSet]
    order: OrderFacts
    draft_orders: Sequence[OrderFacts]
    record: PatientRecord
    statuses: ConditionStatuses
    today: dt.datetime
    medications: Medications
    scope: DecisionScope = field(default_factory=DecisionScope)
    indication: Indication | None = None
    implied_route: str | None = None

    def with_indication(self, indication: Indication | None) -> EvaluationContext:
        return dataclasses.replace(self, indication=indication)

    @property
    def order_date(self) -> dt.datetime:
        return self.order.authored or self.today

    # --- the record -----------------------------------------------------------------------------

    def resources(self, resource_type: str) -> list[Any]:
        """Checked resources of one type (invalid ones are skipped and named by the record)."""
        self.scope.consulted.add(resource_type)
        return self.record.get(resource_type)

    def raw_resources(self, resource_type: str) -> list[Mapping[str, Any]]:
        self.scope.consulted.add(resource_type)
        return self.record.raw_of_type(resource_type)

    def validated(self, raw: Mapping[str, Any]) -> Any | None:
        return self.record.validated(raw)

    def is_draft_order(self, raw: Mapping[str, Any]) -> bool:
        """A resource of the current call's draft orders (by type and id), or a draft: never history."""
        if raw.get("status") == "draft":
            return True
        rid = raw.get("id")
        return isinstance(rid, str) and any(
            o.id == rid and o.resource_type == raw.get("resourceType") for o in self.draft_orders)

    def history(self, resource_type: str) -> Iterator[tuple[Mapping[str, Any], Any]]:
        """Valid resources of one type that are the patient's history: not entered in error, and not one of
        this call's draft orders. Yields the JSON and the checked resource."""
        for raw in self.raw_resources(resource_type):
            if raw.get("status") == "entered-in-error" or self.is_draft_order(raw):
                continue
            model = self.validated(raw)
            if model is not None:
                yield raw, model

    def drug(self, raw: Mapping[str, Any]) -> DrugFacts:
        """The drug of a medication resource of the record (its Medication resolved when it can be)."""
        if isinstance(raw.get("medicationReference"), Mapping):
            self.scope.consulted.add("Medication")
        return drug_facts(self.systems, raw, self.medications)

    def concept(self, model: Any) -> Concept:
        """A :class:`Concept` from a checked CodeableConcept (or None)."""
        if model is None:
            return Concept(codings=())
        codings = []
        for coding in model.coding or []:
            if coding.code:
                short = self.systems.short_name(coding.system)
                codings.append(Coding(short or (coding.system or ""), coding.code.strip(), coding.display))
        return Concept(codings=tuple(codings), text=model.text)

    def find(self, value_set: ValueSet, concept: Concept) -> Match | None:
        """``value_set.find(concept)``, once per decision for each value set and concept (the criteria that
        depend on the indication ask again for each candidate)."""
        key = (value_set.name, concept)
        found = self.scope.found
        if key not in found:
            found[key] = value_set.find(concept)
        return found[key]

    def conditions(self, status: str) -> Iterator[CountedCondition]:
        """Conditions that count under the status rule ``status`` (see condition-status.yaml); read once per
        decision."""
        key = f"conditions:{status}"
        counted = self.scope.memo.get(key)
        if counted is None:
            counted = self.scope.memo[key] = list(self._conditions(status))
        return iter(counted)

    def _conditions(self, status: str) -> Iterator[CountedCondition]:
        for condition in self.resources("Condition"):
            counted = self.counted(condition, status)
            if counted is not None:
                yield counted

    def counted(self, condition: Any, status: str) -> CountedCondition | None:
        """``condition`` as it counts under the status rule ``status``, or None when the rule does not count it
        (refuted or entered-in-error always; resolved, inactive or abated as the rule says)."""
        rule = self.statuses.rule(status)
        verification = status_code(condition.verificationStatus)
        if verification in self.statuses.never:
            return None
        clinical = status_code(condition.clinicalStatus)
        if clinical is None:
            if rule.without_clinical_status == "unless-abated" and abated(condition):
                return None
        elif clinical not in rule.clinical:
            return None
        question = verification if verification in self.statuses.question else None
        return CountedCondition(condition, self.concept(condition.code), reference_of(condition), question)

    def onset(self, condition: Any) -> dt.datetime | None:
        """When a Condition began (onsetDateTime, onsetPeriod.start), or None."""
        moment = as_utc(getattr(condition, "onsetDateTime", None))
        period = getattr(condition, "onsetPeriod", None)
        if moment is None and period is not None:
            moment = as_utc(period.start)
        return moment


def abated(condition: Any) -> bool:
    return bool(condition.abatementDateTime or condition.abatementPeriod or condition.abatementString
                or condition.abatementAge or condition.abatementRange)


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


def raw_reference(raw: Mapping[str, Any]) -> str:
    rid = raw.get("id")
    return f"{raw.get('resourceType')}/{rid}" if isinstance(rid, str) and rid else f"{raw.get('resourceType')}/(no id)"


def references(items: Sequence[Any] | None) -> list[str]:
    return [r.reference for r in items or [] if getattr(r, "reference", None)]


def same_reference(a: str, b: str) -> bool:
    return a == b or a.endswith("/" + b) or b.endswith("/" + a)
