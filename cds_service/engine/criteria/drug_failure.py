"""A drug that was tried and was ineffective or not tolerated, whichever resource records it.

US Core EHRs send the medication list as MedicationRequest (stopped / completed / on-hold, with a
statusReason); others as MedicationStatement or MedicationAdministration; an intolerance may be an
AllergyIntolerance with its reaction. Each is read; this call's draft orders are never history. The reason
may be coded or written (read whole-word and negation-aware: "no side effects" is not a side effect).
Words that name an adverse effect or a failure only in passing (``stop_reason_words``: "sedation", "fatigue",
"failed") count only when they are the record's stop reason (statusReason), never in a note.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ...terminology import Concept, ValueSet
from ..context import EvaluationContext, raw_reference, status_code
from ..decision import Evidence, Gap, Result
from .base import Criterion, Lookup, check_keys, one_value_set, value_sets
from .route import CODED, WRITTEN, RouteClue, find_route

_ENDED = frozenset({"stopped", "completed", "on-hold", "cancelled", "not-taken"})
_SOURCES = ("MedicationStatement", "MedicationRequest", "MedicationAdministration")


class DrugFailure(Criterion):
    kind = "drug_failure"
    reads = ("MedicationStatement", "MedicationRequest", "MedicationAdministration", "AllergyIntolerance",
             "Medication")

    def __init__(self, params: Any, lookup: Lookup) -> None:
        p = check_keys(self.kind, params, {"drug", "failure_reasons"},
                       {"exclude_routes", "exclude_drugs", "allergy", "stop_reason_words"})
        self.drug = one_value_set(lookup, p, "drug")
        self.exclude_routes = value_sets(lookup, p, "exclude_routes") if "exclude_routes" in p else []
        self.exclude_drugs = value_sets(lookup, p, "exclude_drugs") if "exclude_drugs" in p else []
        self.failure_reasons = one_value_set(lookup, p, "failure_reasons")
        self.allergy = one_value_set(lookup, p, "allergy") if "allergy" in p else None
        self.stop_reason_words = one_value_set(lookup, p, "stop_reason_words") if "stop_reason_words" in p else None

    def searches(self) -> Mapping[str, Sequence[ValueSet] | None]:
        return {t: None for t in self.reads if t != "Medication"}

    def _reasons(self, ctx: EvaluationContext, rtype: str, model: Any) -> Iterator[tuple[Concept, list[ValueSet]]]:
        """Each written or coded reason on the record, with the vocabularies it is read with."""
        stop_reason = [self.failure_reasons, *([self.stop_reason_words] if self.stop_reason_words else [])]
        reason = model.statusReason
        for item in reason if isinstance(reason, list) else [reason] if reason is not None else []:
            yield ctx.concept(item), stop_reason
        if rtype == "MedicationAdministration":
            for item in model.reasonCode or []:
                yield ctx.concept(item), [self.failure_reasons]
        for note in model.note or []:
            if note.text:
                yield Concept((), note.text), [self.failure_reasons]

    def _dosages(self, rtype: str, model: Any) -> list[Any]:
        if rtype == "MedicationRequest":
            return list(model.dosageInstruction or [])
        if rtype == "MedicationStatement":
            return list(model.dosage or [])
        return [model.dosage] if model.dosage is not None else []

    def _excluded(self, ctx: EvaluationContext, rtype: str, model: Any, concepts: list[Concept]) -> bool:
        if any(vs.find(c) for vs in self.exclude_drugs for c in concepts):
            return True
        if not self.exclude_routes:
            return False
        clues = []
        for dosage in self._dosages(rtype, model):
            if dosage.route is not None:
                clues.append(RouteClue(ctx.concept(dosage.route), "route", CODED))
            if dosage.text:
                clues.append(RouteClue(Concept((), dosage.text), "dosage text", WRITTEN))
        route = find_route(self.exclude_routes, clues)
        return route is not None

    def _evaluate(self, ctx: EvaluationContext) -> Result:
        seen: list[Evidence] = []
        for rtype in _SOURCES:
            for raw, model in ctx.history(rtype):
                drug = ctx.drug(raw)
                named = next((c for c in drug.concepts if self.drug.find(c)), None)
                if named is None or self._excluded(ctx, rtype, model, drug.concepts):
                    continue
                ref = raw_reference(raw)
                status = str(model.status)
                if status in _ENDED or rtype == "MedicationAdministration":
                    for reason, vocabularies in self._reasons(ctx, rtype, model):
                        found = next((f for f in (vs.find(reason) for vs in vocabularies) if f), None)
                        if found is not None:
                            if found.via_text:
                                ctx.scope.read_text(f"{ref}: reason written '{reason.label()}'")
                            return Result.met(Evidence(ref, f"{self.drug.title} ({named.label()}) {status}: "
                                                            f"'{reason.label()}' [{found.how}]"))
                seen.append(Evidence(ref, f"{self.drug.title} ({named.label()}) {status}, with no documented "
                                          "ineffectiveness or intolerance"))
        if self.allergy is not None:
            for raw in ctx.raw_resources("AllergyIntolerance"):
                allergy = ctx.validated(raw)
                if allergy is None or status_code(allergy.verificationStatus) in {"refuted", "entered-in-error"}:
                    continue
                substances = [ctx.concept(allergy.code),
                              *(ctx.concept(r.substance) for r in allergy.reaction or [] if r.substance)]
                found = next((f for f in (self.allergy.find(c) for c in substances) if f), None)
                if found is None:
                    continue
                reactions = [ctx.concept(m).label() for r in allergy.reaction or [] for m in r.manifestation or []]
                detail = f" (reaction: {', '.join(reactions)})" if reactions else ""
                return Result.met(Evidence(raw_reference(raw), f"allergy or intolerance to '{substances[0].label()}'"
                                                               f"{detail} [{found.how}]"))
        return Result.unknown(Gap(f"a trial of {self.drug.title} that was ineffective or not tolerated", None,
                                  "drug-failure", self.drug.name), *seen)
