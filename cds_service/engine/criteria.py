"""The criterion kinds that policy files combine. Each reads the evaluation context and answers
met / not met / unknown (evidence missing), with the evidence it used and what is missing.

A criterion never decides coverage: rules do, from the criteria's answers.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, ClassVar

from ..terminology import Concept, ValueSet
from .context import EvaluationContext, as_utc, period_of, reference_of, references, status_code
from .decision import Evidence, Result, Status


class CriterionError(ValueError):
    """A criterion in a policy file is not valid."""


class Criterion:
    kind: ClassVar[str]
    #: resource types (besides the order) that the criterion reads; used to build prefetch templates
    reads: ClassVar[tuple[str, ...]] = ()
    uses_indication: bool = False
    missing_text: str | None = None

    def evaluate(self, ctx: EvaluationContext) -> Result:
        raise NotImplementedError

    def children(self) -> Sequence[Criterion]:
        return ()

    def searches(self) -> Mapping[str, ValueSet | None]:
        """Resource types read, each with the value set its codes are in (None: every resource)."""
        return {t: None for t in self.reads}

    def value_set_names(self) -> Sequence[str]:
        return ()

    def _unknown(self, default: str, *evidence: Evidence, notes: list[str] | None = None) -> Result:
        return Result.unknown(self.missing_text or default, *evidence, notes=notes)


ValueSetLookup = Callable[[str], ValueSet]


def _names(params: Any, key: str) -> list[str]:
    value = params.get(key) if isinstance(params, Mapping) else params
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise CriterionError(f"'{key}' must name a value set or a list of value sets")


def _bool(params: Mapping[str, Any], key: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise CriterionError(f"'{key}' must be true or false")
    return value


def _check_keys(kind: str, params: Any, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(params, Mapping):
        raise CriterionError(f"{kind}: expected a mapping of parameters")
    unknown = set(params) - allowed
    if unknown:
        raise CriterionError(f"{kind}: unknown parameter(s) {sorted(unknown)}")
    return params


# --- indication and diagnoses -------------------------------------------------------------------


class IndicationIn(Criterion):
    """The indication under consideration is in one of the value sets."""

    kind = "indication_in"
    uses_indication = True

    def __init__(self, params: Any, lookup: ValueSetLookup) -> None:
        self.sets = [lookup(n) for n in _names(params, "indication_in")]

    def value_set_names(self) -> Sequence[str]:
        return [vs.name for vs in self.sets]

    def evaluate(self, ctx: EvaluationContext) -> Result:
        indication = ctx.indication
        if indication is None:
            return self._unknown("the indication for the order")
        for vs in self.sets:
            how = vs.match(indication.concept)
            if how:
                return Result.met(Evidence(indication.reference,
                                           f"indication '{indication.concept.label()}' ({indication.source}) "
                                           f"is {vs.title} [{how}]"))
        return Result.not_met()


class ActiveCondition(Criterion):
    """An active diagnosis in the value set, on the order (reasonCode) or the patient's problem list."""

    kind = "active_condition"
    reads = ("Condition",)

    def __init__(self, params: Any, lookup: ValueSetLookup) -> None:
        self.value_set = lookup(_names(params, "active_condition")[0])

    def value_set_names(self) -> Sequence[str]:
        return [self.value_set.name]

    def evaluate(self, ctx: EvaluationContext) -> Result:
        for reason in ctx.order.reasons:
            how = self.value_set.match(reason)
            if how:
                return Result.met(Evidence(ctx.order.reference,
                                           f"order reason '{reason.label()}' is {self.value_set.title} [{how}]"))
        for condition, concept in ctx.active_conditions():
            how = self.value_set.match(concept)
            if how:
                return Result.met(Evidence(reference_of(condition),
                                           f"active condition '{concept.label()}' is {self.value_set.title} [{how}]"))
        return self._unknown(f"an active diagnosis of {self.value_set.title}")


# --- the order's route --------------------------------------------------------------------------


def _route_matches(ctx: EvaluationContext, value_set: ValueSet, concepts: Sequence[Concept]) -> str | None:
    for concept in concepts:
        how = value_set.match(concept)
        if how:
            return how
    return None


class OrderRouteIn(Criterion):
    """The order's route (dosage route, body site, or implied by the order code) is in the value set."""

    kind = "order_route_in"

    def __init__(self, params: Any, lookup: ValueSetLookup) -> None:
        self.value_set = lookup(_names(params, "order_route_in")[0])

    def value_set_names(self) -> Sequence[str]:
        return [self.value_set.name]

    def evaluate(self, ctx: EvaluationContext) -> Result:
        if ctx.implied_route is not None:
            if ctx.implied_route == self.value_set.name:
                return Result.met(Evidence(ctx.order.reference,
                                           f"the order code implies the {self.value_set.title} route"))
            return Result.not_met(Evidence(ctx.order.reference, "the order code implies another route"))
        routes = ctx.order.routes
        if not routes:
            return self._unknown("the route of administration")
        how = _route_matches(ctx, self.value_set, routes)
        labels = ", ".join(r.label() for r in routes)
        if how:
            return Result.met(Evidence(ctx.order.reference, f"route {labels} is {self.value_set.title} [{how}]"))
        return Result.not_met(Evidence(ctx.order.reference, f"route {labels} is not {self.value_set.title}"))


# --- combinators --------------------------------------------------------------------------------


class Not(Criterion):
    kind = "not"

    def __init__(self, params: Any, lookup: ValueSetLookup) -> None:
        self.inner = build_criterion(params, lookup)
        self.uses_indication = self.inner.uses_indication

    def children(self) -> Sequence[Criterion]:
        return [self.inner]

    def evaluate(self, ctx: EvaluationContext) -> Result:
        result = self.inner.evaluate(ctx)
        flipped = {Status.MET: Status.NOT_MET, Status.NOT_MET: Status.MET}.get(result.status, Status.UNKNOWN)
        return Result(flipped, result.evidence, result.missing, result.notes)


class AnyOf(Criterion):
    kind = "any_of"

    def __init__(self, params: Any, lookup: ValueSetLookup) -> None:
        if not isinstance(params, list) or not params:
            raise CriterionError(f"{self.kind}: expected a non-empty list of criteria")
        self.items = [build_criterion(p, lookup) for p in params]
        self.uses_indication = any(c.uses_indication for c in self.items)

    def children(self) -> Sequence[Criterion]:
        return self.items

    def evaluate(self, ctx: EvaluationContext) -> Result:
        unknown: list[Result] = []
        for item in self.items:
            result = item.evaluate(ctx)
            if result.status is Status.MET:
                return result
            if result.status is Status.UNKNOWN:
                unknown.append(result)
        if unknown:
            return Result(Status.UNKNOWN, missing=[m for r in unknown for m in r.missing][:1])
        return Result.not_met()


class AllOf(AnyOf):
    kind = "all_of"

    def evaluate(self, ctx: EvaluationContext) -> Result:
        return evaluate_all(self.items, ctx)


def evaluate_all(items: Sequence[Criterion], ctx: EvaluationContext) -> Result:
    """All criteria met: met (evidence of all); one not met: not met (stops there); else unknown."""
    combined = Result(Status.MET)
    for item in items:
        result = item.evaluate(ctx)
        combined.evidence.extend(result.evidence)
        combined.notes.extend(result.notes)
        if result.status is Status.NOT_MET:
            combined.status = Status.NOT_MET
            return combined
        if result.status is Status.UNKNOWN:
            combined.status = Status.UNKNOWN
            combined.missing.extend(result.missing)
    return combined


# --- the pump's drug ----------------------------------------------------------------------------


class PumpDrugNotApproved(Criterion):
    """A drug ordered (in the same draft orders) for the pump's route is not FDA approved for it:
    listed as not approved, a mixture of two or more drugs, or a compounded drug."""

    kind = "pump_drug_not_approved"

    def __init__(self, params: Any, lookup: ValueSetLookup) -> None:
        p = _check_keys(self.kind, params, {"routes", "not_approved", "reject_mixtures", "reject_compounded"})
        self.routes = lookup(_names(p, "routes")[0])
        self.not_approved = lookup(_names(p, "not_approved")[0])
        self.reject_mixtures = _bool(p, "reject_mixtures", True)
        self.reject_compounded = _bool(p, "reject_compounded", True)

    def value_set_names(self) -> Sequence[str]:
        return [self.routes.name, self.not_approved.name]

    def evaluate(self, ctx: EvaluationContext) -> Result:
        pump_drugs = [
            o for o in ctx.draft_orders
            if o.resource_type == "MedicationRequest" and _route_matches(ctx, self.routes, o.routes)
        ]
        if not pump_drugs:
            return Result.not_met(notes=[f"no {self.routes.title} drug order in this request"])
        found: list[Evidence] = []
        drugs: set[str] = set()
        for order in pump_drugs:
            label = order.code.label()
            drugs.add(_drug_key(order.code))
            for concept in (order.code, *order.ingredients):
                how = self.not_approved.match(concept)
                if how:
                    found.append(Evidence(order.reference, f"'{concept.label()}' is {self.not_approved.title} [{how}]"))
                    break
            if self.reject_mixtures and len(order.ingredients) >= 2:
                found.append(Evidence(order.reference,
                                      f"'{label}' is a mixture of {len(order.ingredients)} drugs"))
            if self.reject_compounded and order.compounded_hint:
                found.append(Evidence(order.reference, f"'{order.compounded_hint}' is a compounded drug"))
        if self.reject_mixtures and len(drugs) >= 2:
            found.append(Evidence(", ".join(o.reference for o in pump_drugs),
                                  f"{len(drugs)} different drugs ordered for the same {self.routes.title} route"))
        if found:
            return Result.met(*found)
        return Result.not_met(*(Evidence(o.reference, f"pump drug '{o.code.label()}'") for o in pump_drugs))


def _drug_key(concept: Concept) -> str:
    for coding in concept.codings:
        return f"{coding.system}|{coding.code}"
    return (concept.text or "").strip().lower()


# --- temporary trial ----------------------------------------------------------------------------

_DONE = frozenset({"completed"})
_FINAL_OBSERVATION = frozenset({"final", "amended", "corrected"})


@dataclass
class _Trial:
    reference: str
    label: str
    routes: set[str]
    start: dt.datetime | None
    end: dt.datetime | None
    parts: set[str]


@dataclass(eq=False)
class _Score:
    reference: str
    code: str
    value: Decimal
    when: dt.datetime | None
    part_of: set[str]
    raw: Mapping[str, Any]


def _raw_number(raw: Mapping[str, Any]) -> Decimal | None:
    quantity = raw.get("valueQuantity")
    value = quantity.get("value") if isinstance(quantity, Mapping) else raw.get("valueInteger")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return Decimal(str(value))


def _raw_references(raw: Mapping[str, Any], key: str) -> set[str]:
    items = raw.get(key)
    if not isinstance(items, list):
        return set()
    return {str(r["reference"]) for r in items if isinstance(r, Mapping) and isinstance(r.get("reference"), str)}


class TemporaryTrial(Criterion):
    """A temporary trial by the same route as the planned pump reduced pain by more than N percent,
    comparing, on the same scale, the last score before the trial with a score during or after it."""

    kind = "temporary_trial"
    reads = ("Procedure", "MedicationAdministration", "Observation")

    def __init__(self, params: Any, lookup: ValueSetLookup) -> None:
        p = _check_keys(self.kind, params, {"trials", "trial_drugs", "routes", "pain_scores",
                                            "more_than_percent", "result_within_hours"})
        self.trials = lookup(_names(p, "trials")[0])
        self.trial_drugs = lookup(_names(p, "trial_drugs")[0])
        self.routes = [lookup(n) for n in _names(p, "routes")]
        self.pain_scores = lookup(_names(p, "pain_scores")[0])
        percent = p.get("more_than_percent")
        window = p.get("result_within_hours", 72)
        if not isinstance(percent, int | float) or not 0 < percent < 100:
            raise CriterionError(f"{self.kind}: more_than_percent must be a number between 0 and 100")
        if not isinstance(window, int) or window <= 0:
            raise CriterionError(f"{self.kind}: result_within_hours must be a positive whole number")
        self.threshold = Decimal(str(percent)) / 100
        self.window = dt.timedelta(hours=window)

    def searches(self) -> Mapping[str, ValueSet | None]:
        return {"Procedure": self.trials, "MedicationAdministration": None, "Observation": self.pain_scores}

    def value_set_names(self) -> Sequence[str]:
        return [self.trials.name, self.trial_drugs.name, *(r.name for r in self.routes), self.pain_scores.name]

    def _route_names(self, ctx: EvaluationContext, concepts: Sequence[Concept]) -> set[str]:
        return {vs.name for vs in self.routes if _route_matches(ctx, vs, concepts)}

    def _planned_routes(self, ctx: EvaluationContext) -> tuple[set[str], list[Evidence]]:
        routes = self._route_names(ctx, [*ctx.order.routes, *ctx.order.details])
        evidence = [Evidence(ctx.order.reference, "route on the pump order")] if routes else []
        for order in ctx.draft_orders:
            if order.resource_type == "MedicationRequest":
                found = self._route_names(ctx, order.routes)
                if found:
                    routes |= found
                    evidence.append(Evidence(order.reference, f"pump drug '{order.code.label()}' by "
                                             + " and ".join(self._title(r) for r in sorted(found)) + " route"))
        return routes, evidence

    def _title(self, name: str) -> str:
        return next(vs.title for vs in self.routes if vs.name == name)

    def _trials(self, ctx: EvaluationContext) -> list[_Trial]:
        administrations = [
            a for a in ctx.record.of_type("MedicationAdministration") if a.status in _DONE
        ]
        trials = []
        for procedure in ctx.record.of_type("Procedure"):
            if procedure.status not in _DONE:
                continue
            code = ctx.concept(procedure.code)
            if not self.trials.match(code):
                continue
            ref = reference_of(procedure)
            concepts = [code, *(ctx.concept(b) for b in procedure.bodySite or [])]
            for admin in administrations:
                if any(_same_ref(r, ref) for r in references(admin.partOf)):
                    concepts.append(ctx.concept(admin.dosage.route if admin.dosage else None))
            start, end = period_of(procedure, "performed")
            trials.append(_Trial(ref, code.label(), self._route_names(ctx, concepts), start, end, {ref}))
        for admin in administrations:
            if any(any(_same_ref(r, t.reference) for t in trials) for r in references(admin.partOf)):
                continue
            drug = ctx.medication_concepts(admin)
            if not any(self.trial_drugs.match(c) for c in drug):
                continue
            routes = self._route_names(ctx, [ctx.concept(admin.dosage.route if admin.dosage else None)])
            if not routes:
                continue
            start, end = period_of(admin, "effective")
            ref = reference_of(admin)
            trials.append(_Trial(ref, drug[0].label() if drug else "medication administration", routes,
                                 start, end, {ref}))
        return trials

    def _scores(self, ctx: EvaluationContext) -> list[_Score]:
        """Pain scores read from the raw Observations: a record may hold dozens, and only the baseline
        and result a trial is judged on are validated (in :meth:`_assess`)."""
        scores = []
        for raw in ctx.record.raw_of_type("Observation"):
            if raw.get("status") not in _FINAL_OBSERVATION:
                continue
            coding = self.pain_scores.first_match(ctx.systems.concept(raw.get("code")).codings)
            value = _raw_number(raw)
            if coding is None or value is None:
                continue
            period = raw.get("effectivePeriod")
            when = as_utc(raw.get("effectiveDateTime")) or (
                as_utc(period.get("start")) if isinstance(period, Mapping) else None)
            scores.append(_Score(f"Observation/{raw.get('id')}", coding.code, value, when,
                                 _raw_references(raw, "partOf"), raw))
        return scores

    def evaluate(self, ctx: EvaluationContext) -> Result:
        planned, planned_evidence = self._planned_routes(ctx)
        trials = self._trials(ctx)
        scores = self._scores(ctx) if trials else []
        route_words = " or ".join(vs.title for vs in self.routes)
        if not trials:
            return self._unknown(
                f"a documented temporary trial ({route_words}) with pain scores before and after it showing "
                f"more than {self.threshold * 100:.0f}% reduction",
                *planned_evidence,
            )
        evidence = list(planned_evidence)
        notes: list[str] = []
        outcomes: list[tuple[Status, _Trial]] = []
        for trial in trials:
            same_route = bool(planned & trial.routes) if planned else True
            if planned and not same_route:
                route = " and ".join(self._title(r) for r in sorted(trial.routes)) or "an unknown route"
                notes.append(f"{trial.reference} ({trial.label}) was by {route}, not the planned route")
                evidence.append(Evidence(trial.reference, f"trial by {route}: not the planned route"))
                continue
            status, finding = self._assess(ctx, trial, scores)
            evidence.append(Evidence(trial.reference, finding[0]))
            evidence.extend(finding[1])
            if not trial.routes:
                status = Status.UNKNOWN if status is Status.MET else status
                notes.append(f"the route of {trial.reference} is not recorded")
            outcomes.append((status, trial))
        planned_words = " and ".join(self._title(r) for r in sorted(planned))
        if any(s is Status.MET for s, _ in outcomes):
            if not planned:
                return self._unknown("the route of the planned pump therapy (order the pump drug with its route)",
                                     *evidence, notes=notes)
            if len(planned) > 1:
                return self._unknown("a single planned route for the pump (orders name both)", *evidence, notes=notes)
            return Result.met(*evidence, notes=notes)
        if any(s is Status.NOT_MET for s, _ in outcomes):
            return Result.not_met(*evidence, notes=notes)
        if outcomes:
            return self._unknown(
                "pain scores on the same scale before and after the temporary trial", *evidence, notes=notes
            )
        return self._unknown(f"a temporary trial by the same route as the planned pump ({planned_words})",
                             *evidence, notes=notes)

    @staticmethod
    def _best(trial: _Trial, scores: list[_Score], results: list[_Score]) -> tuple[Decimal, _Score, _Score] | None:
        """The largest reduction from the last score before the trial to a score during/after it."""
        assert trial.start is not None
        best: tuple[Decimal, _Score, _Score] | None = None
        for result in results:
            baselines = [s for s in scores if s.code == result.code and s.when is not None
                         and s.when < trial.start and s not in results]
            if not baselines:
                continue
            baseline = max(baselines, key=lambda s: s.when or dt.datetime.min.replace(tzinfo=dt.UTC))
            if baseline.value <= 0:
                continue
            reduction = (baseline.value - result.value) / baseline.value
            if best is None or reduction > best[0]:
                best = (reduction, baseline, result)
        return best

    def _assess(self, ctx: EvaluationContext, trial: _Trial,
                scores: list[_Score]) -> tuple[Status, tuple[str, list[Evidence]]]:
        def in_trial(score: _Score) -> bool:
            if any(_same_ref(p, ref) for p in score.part_of for ref in trial.parts):
                return True
            if score.when is None or trial.start is None:
                return False
            end = (trial.end or trial.start) + self.window
            return trial.start <= score.when <= end

        results = [s for s in scores if in_trial(s)]
        if not results:
            return Status.UNKNOWN, (f"trial '{trial.label}' has no pain score during or after it", [])
        if trial.start is None:
            return Status.UNKNOWN, (f"trial '{trial.label}' has no date, so no baseline score can be found", [])
        best = self._best(trial, scores, results)
        while best is not None:
            invalid = [s for s in best[1:] if ctx.record.validated(s.raw) is None]
            if not invalid:
                break
            scores = [s for s in scores if s not in invalid]
            results = [s for s in results if s not in invalid]
            best = self._best(trial, scores, results)
        if best is None:
            return Status.UNKNOWN, (f"trial '{trial.label}' has no baseline pain score on the same scale before it",
                                    [])
        reduction, baseline, result = best
        percent = f"{(reduction * 100).quantize(Decimal('0.1'))}%"
        supporting = [
            Evidence(baseline.reference, f"baseline pain score {baseline.value} ({baseline.code})"),
            Evidence(result.reference, f"pain score {result.value} during/after the trial ({result.code})"),
        ]
        if reduction > self.threshold:
            return Status.MET, (f"trial '{trial.label}' reduced pain by {percent}", supporting)
        return Status.NOT_MET, (
            f"trial '{trial.label}' reduced pain by {percent}, not more than {self.threshold * 100:.0f}%",
            supporting,
        )


def _same_ref(a: str, b: str) -> bool:
    return a == b or a.endswith("/" + b) or b.endswith("/" + a)


# --- failure or intolerance of a drug -----------------------------------------------------------

_STOPPED = frozenset({"stopped", "completed"})


class DrugFailure(Criterion):
    """The drug was tried and was ineffective or not tolerated: a MedicationStatement, stopped or
    completed, whose statusReason (coded or written) says so, or an AllergyIntolerance to it."""

    kind = "drug_failure"
    reads = ("MedicationStatement", "AllergyIntolerance", "Medication")

    def __init__(self, params: Any, lookup: ValueSetLookup) -> None:
        p = _check_keys(self.kind, params, {"drug", "exclude_routes", "failure_reasons", "allergy", "missing"})
        self.drug = lookup(_names(p, "drug")[0])
        self.exclude_routes = lookup(_names(p, "exclude_routes")[0]) if "exclude_routes" in p else None
        self.failure_reasons = lookup(_names(p, "failure_reasons")[0])
        self.allergy = lookup(_names(p, "allergy")[0]) if "allergy" in p else None
        if isinstance(p.get("missing"), str):
            self.missing_text = p["missing"]

    def value_set_names(self) -> Sequence[str]:
        names = [self.drug.name, self.failure_reasons.name]
        names += [vs.name for vs in (self.exclude_routes, self.allergy) if vs is not None]
        return names

    def evaluate(self, ctx: EvaluationContext) -> Result:
        seen: list[Evidence] = []
        for statement in ctx.record.of_type("MedicationStatement"):
            if statement.status == "entered-in-error":
                continue
            drug = next((c for c in ctx.medication_concepts(statement) if self.drug.match(c)), None)
            if drug is None:
                continue
            routes = [ctx.concept(d.route) for d in statement.dosage or [] if d.route is not None]
            if self.exclude_routes is not None and any(self.exclude_routes.match(r) for r in routes):
                continue
            ref = reference_of(statement)
            if statement.status in _STOPPED:
                for reason in statement.statusReason or []:
                    how = self.failure_reasons.match(ctx.concept(reason))
                    if how:
                        return Result.met(Evidence(ref, f"{self.drug.title} ({drug.label()}) {statement.status}: "
                                                        f"'{ctx.concept(reason).label()}' [{how}]"))
            seen.append(Evidence(ref, f"{self.drug.title} ({drug.label()}) {statement.status}, "
                                      "with no documented ineffectiveness or intolerance"))
        if self.allergy is not None:
            for allergy in ctx.record.of_type("AllergyIntolerance"):
                if status_code(allergy.verificationStatus) in {"refuted", "entered-in-error"}:
                    continue
                concept = ctx.concept(allergy.code)
                how = self.allergy.match(concept)
                if how:
                    return Result.met(Evidence(reference_of(allergy),
                                               f"allergy or intolerance to '{concept.label()}' [{how}]"))
        return self._unknown(f"a trial of {self.drug.title} that was ineffective or not tolerated", *seen)


KINDS: dict[str, type[Criterion]] = {
    cls.kind: cls
    for cls in (IndicationIn, ActiveCondition, OrderRouteIn, Not, AnyOf, AllOf, PumpDrugNotApproved,
                TemporaryTrial, DrugFailure)
}


def build_criterion(spec: Any, lookup: ValueSetLookup) -> Criterion:
    """A criterion from its policy-file form: a mapping with one kind key (and optionally 'missing')."""
    if not isinstance(spec, Mapping):
        raise CriterionError(f"a criterion must be a mapping with one of {sorted(KINDS)}, not {spec!r}")
    kinds = [k for k in spec if k != "missing"]
    if len(kinds) != 1:
        raise CriterionError(f"a criterion needs exactly one kind (one of {sorted(KINDS)}), got {sorted(kinds)}")
    kind = kinds[0]
    cls = KINDS.get(kind)
    if cls is None:
        raise CriterionError(f"unknown criterion kind {kind!r} (known: {', '.join(sorted(KINDS))})")
    criterion = cls(spec[kind], lookup)  # type: ignore[call-arg]
    missing = spec.get("missing")
    if missing is not None:
        if not isinstance(missing, str):
            raise CriterionError(f"{kind}: 'missing' must be text")
        criterion.missing_text = missing
    return criterion


def walk(criterion: Criterion) -> list[Criterion]:
    out = [criterion]
    for child in criterion.children():
        out.extend(walk(child))
    return out
