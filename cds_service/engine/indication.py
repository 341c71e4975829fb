"""Which indication a policy decides an order for.

The order's own reasons come first: reasonCode and the Conditions its reasonReference points to (a reason
written only as text, or in the order's note, is read too, whole-word and negation-aware). Reasons that
describe the device rather than the patient (a fractured catheter, a battery at end of life: the policy's
``not_indications``) are set aside. Without a usable reason, each current diagnosis on the problem list that
the policy recognises is a candidate.

Each coding is a candidate of its own, so that a Condition coded in ICD-10-CM, SNOMED CT and a vendor system
whose codings point to different answers is seen as the conflict it is. Before that, the most specific code
wins: an ICD-10-CM code gives way to a longer one under it, and a generic diagnosis gives way to a specific one
of the same family (``more_specific`` in the policy file: "cerebral palsy" to "athetoid cerebral palsy").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..terminology import Coding, Concept, ValueSet, normalise_icd10
from .context import EvaluationContext, Indication, status_code


@dataclass(frozen=True)
class Specificity:
    """A generic diagnosis that gives way when a diagnosis of one of the specific sets is present."""

    generic: ValueSet
    specific: tuple[ValueSet, ...]


@dataclass(frozen=True)
class IndicationRules:
    """The policy file's ``indication`` section."""

    recognised: tuple[ValueSet, ...]
    gate_sets: tuple[ValueSet, ...]
    missing: str
    not_indications: ValueSet | None = None
    more_specific: tuple[Specificity, ...] = ()
    #: the status rule (condition-status.yaml) a diagnosis must meet to be the order's indication
    status: str = "current"


@dataclass
class Candidates:
    """The candidate indications of an order: placed by the policy's value sets (``items``; ``from_order`` when
    they are the order's own reasons), the order's reasons no value set places, and notes for the trace."""

    items: list[Indication] = field(default_factory=list)
    from_order: bool = False
    #: order reasons no value set of the policy places (their labels)
    unplaced: list[Indication] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _placed(coding: Coding, sets: Sequence[ValueSet]) -> bool:
    return any(vs.contains(coding) for vs in sets)


def _split(concept: Concept, source: str, reference: str, sets: Sequence[ValueSet], condition: Any | None,
           question: str | None) -> tuple[list[Indication], bool]:
    """One candidate per coding the policy places, else one for the text (when no known code stands in its
    way); and whether the concept was placed at all."""
    found = [Indication(Concept((coding,), concept.text), source, reference, concept, condition, False, question)
             for coding in concept.codings if _placed(coding, sets)]
    if found:
        return found, True
    for vs in sets:
        match = vs.find(concept)
        if match is not None and match.via_text:
            text = Concept((), concept.text or concept.label())
            return [Indication(text, source, reference, concept, condition, True, question)], True
    return [], False


def _icd_codes(indication: Indication) -> list[str]:
    return [normalise_icd10(c.code) for c in indication.concept.codings if c.system == "icd10cm"]


def most_specific(items: list[Indication], rules: Sequence[Specificity]) -> tuple[list[Indication], list[str]]:
    """Drop candidates a more specific one makes redundant; say which in notes."""
    notes: list[str] = []
    icd = {id(i): _icd_codes(i) for i in items}
    all_icd = [code for codes in icd.values() for code in codes]
    kept = []
    for item in items:
        codes = icd[id(item)]
        if codes and all(any(other != code and other.startswith(code) for other in all_icd) for code in codes):
            notes.append(f"'{item.label()}' gives way to a more specific ICD-10-CM code on record")
            continue
        kept.append(item)
    for rule in rules:
        specific = [i for i in kept if any(vs.find(i.concept) for vs in rule.specific)]
        if not specific:
            continue
        generic = [i for i in kept if rule.generic.find(i.concept) and i not in specific]
        for item in generic:
            notes.append(f"'{item.label()}' ({rule.generic.title}) gives way to the more specific "
                         f"'{specific[0].label()}'")
        kept = [i for i in kept if i not in generic]
    unique: dict[tuple[str, ...], Indication] = {}
    for item in kept:
        key = tuple(f"{c.system}|{c.code}" for c in item.concept.codings) or (f"text:{item.concept.text}",)
        unique.setdefault(key, item)
    return list(unique.values()), notes


def _note_text(ctx: EvaluationContext, found: list[Indication]) -> None:
    for item in found:
        if item.via_text:
            ctx.scope.read_text(f"{item.reference}: indication read from text '{item.concept.label()}'")


def indication_candidates(rules: IndicationRules, ctx: EvaluationContext) -> Candidates:
    out = Candidates()
    order = ctx.order
    reasons: list[tuple[Concept, str, str, Any | None, str | None]] = [
        (r, "order reasonCode", order.reference, None, None) for r in order.reasons]
    for ref in order.reason_references:
        ctx.scope.consulted.add("Condition")
        resource = ctx.record.resolve(ref)
        if resource is None or resource.get_resource_type() != "Condition":
            out.notes.append(f"reasonReference {ref} could not be resolved to a Condition")
            continue
        counted = ctx.counted(resource, rules.status)
        if counted is None:
            out.notes.append(f"reasonReference {ref} does not count under the '{rules.status}' status rule "
                             f"(clinical status {status_code(resource.clinicalStatus) or 'not given'}, "
                             f"verification status {status_code(resource.verificationStatus) or 'not given'})")
            continue
        reasons.append((counted.concept, "order reasonReference", counted.reference, resource, counted.question))
    if not reasons and order.notes:
        reasons = [(Concept((), " ".join(order.notes)), "order note", order.reference, None, None)]
        from_note = True
    else:
        from_note = False
    usable = []
    for concept, source, reference, condition, question in reasons:
        mechanical = rules.not_indications.find(concept) if rules.not_indications is not None else None
        if mechanical is not None:
            out.notes.append(f"the order's reason '{concept.label()}' describes the device, not an indication "
                             f"[{mechanical.how}]: the indication is taken from the record")
            continue
        usable.append((concept, source, reference, condition, question))
    for concept, source, reference, condition, question in usable:
        found, placed = _split(concept, source, reference, rules.gate_sets, condition, question)
        _note_text(ctx, found)
        if placed:
            out.items.extend(found)
        elif not from_note:
            out.unplaced.append(Indication(concept, source, reference, concept, condition, False, question))
    if out.items or out.unplaced:
        out.from_order = True
        out.items, notes = most_specific(out.items, rules.more_specific)
        out.notes.extend(notes)
        return out
    for counted in ctx.conditions(rules.status):
        found, _ = _split(counted.concept, "problem list", counted.reference, rules.recognised, counted.resource,
                          counted.question)
        _note_text(ctx, found)
        out.items.extend(found)
    out.items, notes = most_specific(out.items, rules.more_specific)
    out.notes.extend(notes)
    return out
