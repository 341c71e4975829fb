"""The drug an implanted pump delivers, and whether it is FDA approved for the pump's route and for the
indication: an allowlist, never a blocklist.

The pump's drug is a drug ordered in the same request by a route the pump delivers by (intrathecal,
epidural), or linked to the pump order (by reference, by the pump order's own route, or written "pump" in
its instructions); without one, the drug on record that the pump delivers now (an active intrathecal or
epidural medication), which is what a refill or replacement carries on. A drug the service cannot identify
is a question (unknown), never an approval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...terminology import Concept, ValueSet
from ..context import EvaluationContext, raw_reference
from ..decision import Evidence, Failure, Gap, Result, Status
from ..orders import DrugFacts, OrderFacts
from .base import Criterion, CriterionError, Lookup, check_keys, names, value_sets
from .route import CODED, IMPLIED, WRITTEN, RouteClue, RouteFinding, find_route, order_route_clues

_PUMP_WORDS = ("pump", "implanted", "reservoir")
_CURRENT = frozenset({"active", "on-hold", "intended"})


@dataclass(frozen=True)
class PumpDrug:
    reference: str
    drug: DrugFacts
    route: RouteFinding | None
    where: str

    def label(self) -> str:
        return self.drug.code.label() if self.drug.identified else f"the drug of {self.reference}"


@dataclass(frozen=True)
class Approval:
    """A drug approved for pump use by ``routes`` for ``indications``; with ``confirm``, only in one formulation
    that the drug's codes do not show (the answer asks for it)."""

    drug: ValueSet
    routes: tuple[ValueSet, ...]
    indications: tuple[str, ...]
    confirm: str | None = None

    def route_names(self) -> set[str]:
        return {vs.name for vs in self.routes}


@dataclass(frozen=True)
class ApprovalTable:
    """The ``fda_pump_drugs``-style table of a policy file: which drugs are approved for which pump routes
    and indications, the drugs the service can name although no approval covers them, and diluents (which do
    not make a mixture)."""

    source: str
    approvals: tuple[Approval, ...]
    known: tuple[ValueSet, ...]
    diluents: ValueSet | None

    @classmethod
    def build(cls, name: str, data: Any, lookup: Lookup) -> ApprovalTable:
        p = check_keys(f"table {name}", data, {"source", "approved"}, {"known", "diluents"})
        if not isinstance(p["approved"], list) or not p["approved"]:
            raise CriterionError(f"table {name}: 'approved' must be a non-empty list")
        approvals = []
        for i, item in enumerate(p["approved"]):
            entry = check_keys(f"table {name}: approved[{i}]", item, {"drug", "routes", "indications"}, {"confirm"})
            indications = names(entry, "indications")
            confirm = " ".join(str(entry["confirm"]).split()) if "confirm" in entry else None
            approvals.append(Approval(lookup.value_set(names(entry, "drug")[0]),
                                      tuple(value_sets(lookup, entry, "routes")), tuple(indications), confirm))
        known = tuple(value_sets(lookup, p, "known")) if "known" in p else ()
        diluents = lookup.value_set(names(p, "diluents")[0]) if "diluents" in p else None
        return cls(str(p["source"]), tuple(approvals), known, diluents)

    def indications(self) -> set[str]:
        return {i for a in self.approvals for i in a.indications}


def _linked(drug: OrderFacts, pump: OrderFacts) -> bool:
    if any(pump.matches_reference(r) for r in drug.related_references):
        return True
    if any(drug.matches_reference(r) for r in pump.related_references):
        return True
    texts = [*drug.route_texts, *(d.text or "" for d in drug.details)]
    return any(w in t.lower() for t in texts for w in _PUMP_WORDS)


def pump_drugs(ctx: EvaluationContext, pump_routes: Sequence[ValueSet],
               linked_routes: Sequence[ValueSet]) -> list[PumpDrug]:
    """The drugs the pump ordered in ``ctx.order`` will deliver (see the module's description); found once per
    decision and set of routes (several criteria ask)."""
    key = "pump-drugs:" + "|".join(vs.name for vs in pump_routes) + ":" + "|".join(vs.name for vs in linked_routes)
    found: list[PumpDrug] | None = ctx.scope.memo.get(key)
    if found is None:
        found = ctx.scope.memo[key] = _pump_drugs(ctx, pump_routes, linked_routes)
    return list(found)


def _pump_drugs(ctx: EvaluationContext, pump_routes: Sequence[ValueSet],
                linked_routes: Sequence[ValueSet]) -> list[PumpDrug]:
    pump = ctx.order
    every_route = [*pump_routes, *linked_routes]
    pump_clues = [c for c in order_route_clues(pump) if c.strength != IMPLIED]
    pump_route = find_route(every_route, pump_clues)
    pump_names = {vs.name for vs in pump_routes}
    found = []
    for order in ctx.draft_orders:
        if order is pump or order.resource_type != "MedicationRequest" or order.drug is None:
            continue
        route = find_route(every_route, order_route_clues(order))
        by_route = route is not None and not route.ambiguous and bool(route.names & pump_names)
        same_as_pump = route is not None and pump_route is not None and bool(route.names & pump_route.names)
        if by_route or same_as_pump or _linked(order, pump):
            found.append(PumpDrug(order.reference, order.drug, route, "ordered in this request"))
    if found:
        return found
    for rtype in ("MedicationRequest", "MedicationStatement"):
        for raw, model in ctx.history(rtype):
            if str(raw.get("status")) not in _CURRENT:
                continue
            dosages = (model.dosageInstruction if rtype == "MedicationRequest" else model.dosage) or []
            clues = [RouteClue(ctx.concept(d.route), "route", CODED) for d in dosages if d.route is not None]
            clues += [RouteClue(Concept((), d.text), "dosage text", WRITTEN) for d in dosages if d.text]
            route = find_route(pump_routes, clues)
            if route is not None and not route.ambiguous:
                found.append(PumpDrug(raw_reference(raw), ctx.drug(raw), route, "on record (in use)"))
    return found


def _identify(table: ApprovalTable, drug: DrugFacts) -> tuple[list[Approval], ValueSet | None, str | None]:
    """The approvals whose drug this is, the value set that names it, and how it matched."""
    matched: list[Approval] = []
    named: ValueSet | None = None
    how = None
    for approval in table.approvals:
        for concept in drug.concepts:
            found = approval.drug.find(concept)
            if found is not None:
                matched.append(approval)
                named, how = named or approval.drug, how or found.how
                break
    if named is None:
        for vs in table.known:
            found = next((f for f in (vs.find(c) for c in drug.concepts) if f), None)
            if found is not None:
                return [], vs, found.how
    return matched, named, how


class PumpDrugApproved(Criterion):
    """Every drug the pump will deliver is FDA approved for the pump's route and for the indication (a table
    of the policy file); a mixture of two or more drugs, or a compounded drug, is not."""

    kind = "pump_drug_approved"
    reads = ("MedicationRequest", "MedicationStatement", "Medication")

    def __init__(self, params: Any, lookup: Lookup) -> None:
        p = check_keys(self.kind, params, {"approvals", "indication", "routes"}, {"linked_routes", "indication_words"})
        self.table = lookup.table(str(p["approvals"]))
        if not isinstance(self.table, ApprovalTable):
            raise CriterionError(f"{self.kind}: 'approvals' must name an approvals table")
        self.indication = str(p["indication"])
        if self.indication not in self.table.indications():
            raise CriterionError(f"{self.kind}: no approval in the table is for indication {self.indication!r}")
        self.words = str(p.get("indication_words", self.indication))
        self.routes = value_sets(lookup, p, "routes")
        self.linked_routes = value_sets(lookup, p, "linked_routes") if "linked_routes" in p else []

    def _evaluate(self, ctx: EvaluationContext) -> Result:
        drugs = pump_drugs(ctx, self.routes, self.linked_routes)
        if not drugs:
            return Result.unknown(Gap(
                "the drug the pump will deliver, ordered with its route: the policy covers a pump only for a drug "
                f"FDA approved for that route and for {self.words}", "name the pump drug and its route", "pump-drug"))
        evidence: list[Evidence] = []
        gaps: list[Gap] = []
        keys = {self._key(d) for d in drugs}
        if len(keys) > 1:
            listed = " and ".join(sorted({d.label() for d in drugs}))
            return self._fail(f"{listed}: a mixture of {len(keys)} drugs in one pump",
                              "a mixture of two or more drugs is not FDA approved for an implanted pump", drugs,
                              "a mixture of drugs in the pump is not FDA approved")
        for pump_drug in drugs:
            drug = pump_drug.drug
            if drug.compounded_hint:
                return self._fail(f"'{drug.compounded_hint}' is compounded",
                                  "compounded drugs are not FDA approved for an implanted pump", [pump_drug],
                                  "a compounded pump drug is not FDA approved")
            active = [i for i in drug.ingredients
                      if not (self.table.diluents and self.table.diluents.find(i))]
            if len(active) >= 2:
                return self._fail(f"'{pump_drug.label()}' is a mixture of {len(active)} drugs",
                                  "a mixture of two or more drugs is not FDA approved for an implanted pump",
                                  [pump_drug], "a mixture of drugs in the pump is not FDA approved")
            approvals, named, how = _identify(self.table, drug)
            if named is None:
                if drug.unresolved_reference and not drug.identified:
                    gaps.append(Gap(f"confirmation of the drug of {pump_drug.reference}: its Medication "
                                    f"({drug.unresolved_reference}) could not be read", "confirm the pump drug",
                                    "pump-drug"))
                else:
                    gaps.append(Gap(f"confirmation of the pump drug '{pump_drug.label()}': it is not identified as "
                                    f"a drug FDA approved for the pump's route and for {self.words}",
                                    "confirm the pump drug", "pump-drug"))
                continue
            route = pump_drug.route
            for_indication = [a for a in approvals if self.indication in a.indications]
            if not for_indication:
                other = sorted({i for a in approvals for i in a.indications})
                inferred = ctx.indication is not None and ctx.indication.source == "problem list"
                if other and inferred:
                    # the drug points to another use than the one inferred from the problem list: ask, not deny
                    gaps.append(Gap(f"the indication for the pump: its drug {named.title} is approved for "
                                    f"{' and '.join(other)}, the problem list suggests {self.words}, and the order "
                                    "states no reason", "state the pump's indication", "indication"))
                    continue
                detail = (f"it is approved for {' and '.join(other)} only" if other
                          else "it is not FDA approved for an implanted pump")
                return self._fail(f"the pump drug '{pump_drug.label()}' is {named.title} [{how}]",
                                  f"{named.title} is not FDA approved for an implanted pump for {self.words}: "
                                  f"{detail}", [pump_drug], f"{named.title} is not FDA approved for this pump use")
            if route is None or route.ambiguous:
                gaps.append(Gap(f"the route of the pump drug {named.title} ({pump_drug.reference})",
                                "state the pump drug's route", "pump-drug"))
                continue
            allowed = {name for a in for_indication for name in a.route_names()}
            if not route.names <= allowed:
                titles = sorted({vs.title for a in for_indication for vs in a.routes})
                return self._fail(f"the pump drug '{pump_drug.label()}' is {named.title} [{how}], by the "
                                  f"{route.words} route [{route.how}]",
                                  f"{named.title} is FDA approved for pump use by the {' or '.join(titles)} route, "
                                  f"not {route.words}", [pump_drug],
                                  f"{named.title} is not FDA approved for {route.words} pump use")
            by_route = [a for a in for_indication if route.names & a.route_names()]
            if all(a.confirm for a in by_route):
                gaps.append(Gap(f"confirmation {by_route[0].confirm}: the pump drug '{pump_drug.label()}' "
                                f"({pump_drug.reference}) is {named.title} [{how}], by the {route.words} route",
                                "confirm the pump drug's product", "pump-drug"))
                continue
            evidence.append(Evidence(pump_drug.reference,
                                     f"the pump drug '{pump_drug.label()}' ({pump_drug.where}) is {named.title} "
                                     f"[{how}], FDA approved by the {route.words} route for {self.words} "
                                     f"[{route.how}]"))
        if gaps:
            return Result(Status.UNKNOWN, evidence, gaps)
        return Result.met(*evidence)

    @staticmethod
    def _key(pump_drug: PumpDrug) -> str:
        concepts = pump_drug.drug.concepts
        if not concepts:
            return pump_drug.reference
        for coding in concepts[0].codings:
            return f"{coding.system}|{coding.code}"
        return (concepts[0].text or "").strip().lower()

    @staticmethod
    def _fail(finding: str, reason: str, drugs: Sequence[PumpDrug], summary: str) -> Result:
        return Result.not_met(*(Evidence(d.reference, finding) for d in drugs),
                              failure=Failure(summary=summary, reason=f"{finding[0].upper()}{finding[1:]}: {reason}."))

    def searches(self) -> Mapping[str, Sequence[ValueSet] | None]:
        return {"MedicationRequest": None, "MedicationStatement": None}


class PumpDrugIn(Criterion):
    """A drug the pump will deliver is in the value sets (e.g. insulin: a use unrelated to pain)."""

    kind = "pump_drug_in"
    reads = ("MedicationRequest", "MedicationStatement", "Medication")

    def __init__(self, params: Any, lookup: Lookup) -> None:
        p = check_keys(self.kind, params, {"drugs", "routes"}, {"linked_routes"})
        self.drugs = value_sets(lookup, p, "drugs")
        self.routes = value_sets(lookup, p, "routes")
        self.linked_routes = value_sets(lookup, p, "linked_routes") if "linked_routes" in p else []

    def _evaluate(self, ctx: EvaluationContext) -> Result:
        for pump_drug in pump_drugs(ctx, self.routes, self.linked_routes):
            for vs in self.drugs:
                found = next((f for f in (vs.find(c) for c in pump_drug.drug.concepts) if f), None)
                if found is not None:
                    return Result.met(Evidence(pump_drug.reference, f"the pump's drug is {vs.title} [{found.how}]"))
        return Result.not_met()

    def searches(self) -> Mapping[str, Sequence[ValueSet] | None]:
        return {"MedicationRequest": None, "MedicationStatement": None}
