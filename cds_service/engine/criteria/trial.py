"""The temporary trial before an implanted pump for pain: by the same route as the planned pump, reducing
pain by more than N percent (the last score before the trial against a score during or after it, on the same
scale)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ...terminology import Concept, ValueSet
from ..context import EvaluationContext, raw_reference, references, same_reference
from ..dates import period_of
from ..decision import Evidence, Failure, Gap, Result, Status
from .base import Criterion, CriterionError, Lookup, check_keys, number, one_value_set, value_sets
from .pump_drug import pump_drugs
from .route import CODED, IMPLIED, WRITTEN, RouteClue, RouteFinding, find_route, order_route_clues
from .scores import PainScore, ScoreIndex, pain_scores

_DONE = frozenset({"completed"})
#: invalid scores dropped before a trial is judged on the scores that remain; bounds the work per trial
_MAX_RETRIES = 20


@dataclass
class _Trial:
    reference: str
    label: str
    route: RouteFinding | None
    start: dt.datetime | None
    end: dt.datetime | None
    parts: set[str]


class TemporaryTrial(Criterion):
    kind = "temporary_trial"
    reads = ("Procedure", "MedicationAdministration", "Observation")

    def __init__(self, params: Any, lookup: Lookup) -> None:
        p = check_keys(self.kind, params, {"trials", "trial_drugs", "routes", "pain_scores", "more_than_percent"},
                       {"result_within_hours", "pump_routes", "linked_routes"})
        self.trials = one_value_set(lookup, p, "trials")
        self.trial_drugs = one_value_set(lookup, p, "trial_drugs")
        self.routes = value_sets(lookup, p, "routes")
        self.pump_routes = value_sets(lookup, p, "pump_routes") if "pump_routes" in p else self.routes
        self.linked_routes = value_sets(lookup, p, "linked_routes") if "linked_routes" in p else []
        self.pain_scores = one_value_set(lookup, p, "pain_scores")
        percent = number(p, "more_than_percent", None, 1, 99)
        hours = p.get("result_within_hours", 72)
        if not isinstance(hours, int) or isinstance(hours, bool) or not 0 < hours <= 24 * 30:
            raise CriterionError(f"{self.kind}: result_within_hours must be a whole number of hours (at most 720)")
        self.threshold = Decimal(str(percent)) / 100
        self.window = dt.timedelta(hours=hours)

    def searches(self) -> Mapping[str, Sequence[ValueSet] | None]:
        return {"Procedure": [self.trials], "MedicationAdministration": None, "Observation": [self.pain_scores]}

    # --- the planned route and the trials -------------------------------------------------------

    def _planned(self, ctx: EvaluationContext) -> tuple[set[str], list[Evidence], bool]:
        """The planned route's names, the evidence, and whether a pump drug is known at all (when it is not,
        the pump-drug criterion asks for it and its route)."""
        names: set[str] = set()
        evidence: list[Evidence] = []
        pump = find_route(self.routes, [c for c in order_route_clues(ctx.order) if c.strength != IMPLIED])
        if pump is not None and not pump.ambiguous:
            names |= pump.names
            evidence.append(Evidence(ctx.order.reference, f"planned route {pump.words}: {pump.how}"))
        drugs = pump_drugs(ctx, self.pump_routes, self.linked_routes)
        for drug in drugs:
            if drug.route is not None and not drug.route.ambiguous:
                names |= drug.route.names
                evidence.append(Evidence(drug.reference, f"pump drug '{drug.label()}' by the {drug.route.words} "
                                                          "route"))
        return names, evidence, bool(drugs)

    def _title(self, name: str) -> str:
        return next(vs.title for vs in self.routes if vs.name == name)

    def _trials(self, ctx: EvaluationContext) -> list[_Trial]:
        administrations = [(raw, model) for raw, model in ctx.history("MedicationAdministration")
                           if model.status in _DONE]
        trials = []
        claimed: set[int] = set()
        for _raw, procedure in ctx.history("Procedure"):
            if procedure.status not in _DONE:
                continue
            code = ctx.concept(procedure.code)
            if not self.trials.find(code):
                continue
            ref = f"Procedure/{procedure.id}"
            clues = [RouteClue(code, "trial procedure code", IMPLIED)]
            clues += [RouteClue(ctx.concept(b), "body site", CODED) for b in procedure.bodySite or []]
            clues += [RouteClue(Concept((), n.text), "procedure note", WRITTEN) for n in procedure.note or []
                      if n.text]
            for raw_admin, admin in administrations:
                if any(same_reference(r, ref) for r in references(admin.partOf)):
                    claimed.add(id(raw_admin))
                    clues += self._admin_clues(ctx, admin)
            start, end = period_of(procedure, "performed")
            trials.append(_Trial(ref, code.label(), find_route(self.routes, clues), start, end, {ref}))
        for raw_admin, admin in administrations:
            if id(raw_admin) in claimed:
                continue
            drug = ctx.drug(raw_admin)
            if not any(self.trial_drugs.find(c) for c in drug.concepts):
                continue
            route = find_route(self.routes, self._admin_clues(ctx, admin))
            if route is None:
                continue
            start, end = period_of(admin, "effective")
            ref = raw_reference(raw_admin)
            trials.append(_Trial(ref, drug.code.label() if drug.identified else "medication administration", route,
                                 start, end, {ref}))
        return trials

    @staticmethod
    def _admin_clues(ctx: EvaluationContext, admin: Any) -> list[RouteClue]:
        dosage = admin.dosage
        if dosage is None:
            return []
        clues = []
        if dosage.route is not None:
            clues.append(RouteClue(ctx.concept(dosage.route), "administration route", CODED))
        if dosage.text:
            clues.append(RouteClue(Concept((), dosage.text), "administration text", WRITTEN))
        return clues

    # --- judging ---------------------------------------------------------------------------------

    def _evaluate(self, ctx: EvaluationContext) -> Result:
        planned, evidence, drug_known = self._planned(ctx)
        route_gap = [Gap("the route of the planned pump therapy (order the pump drug with its route)",
                         "state the planned route", "pump-drug")] if drug_known and not planned else []
        trials = self._trials(ctx)
        titles = [self._title(n) for n in sorted(planned)] if planned else [vs.title for vs in self.routes]
        routes_words = " or ".join([", ".join(titles[:-1]), titles[-1]] if len(titles) > 2 else titles)
        percent = f"{self.threshold * 100:.0f}%"
        same = f"by the same route as the planned pump ({routes_words})" if planned else f"by the {routes_words} route"
        wanted = Gap(f"a documented temporary trial {same}, with pain scores before and after it showing more than "
                     f"{percent} reduction", "document a successful temporary trial", "trial")
        if len(planned) > 1:
            return Result(Status.UNKNOWN, evidence, [Gap("a single planned route for the pump (the orders name "
                                                         f"{' and '.join(sorted(self._title(n) for n in planned))})",
                                                         "state the planned route", "pump-drug")])
        if not trials:
            return Result(Status.UNKNOWN, evidence, [wanted, *route_gap])
        scores = pain_scores(ctx, self.pain_scores)
        notes: list[str] = []
        statuses: list[Status] = []
        gaps: list[Gap] = []
        for trial in trials:
            route = trial.route
            if route is None or route.ambiguous:
                why = f"its evidence names {route.words}" if route is not None else "no route is recorded"
                notes.append(f"the route of {trial.reference} ({trial.label}) is not shown: {why}")
                evidence.append(Evidence(trial.reference, f"trial '{trial.label}': route not shown ({why})"))
                gaps.append(Gap(f"the route of the temporary trial {trial.reference} ({why})",
                                "document the trial's route", "trial"))
                statuses.append(Status.UNKNOWN)
                continue
            if planned and not route.names <= planned:
                notes.append(f"{trial.reference} ({trial.label}) was by the {route.words} route, not the planned "
                             "route")
                evidence.append(Evidence(trial.reference, f"trial by the {route.words} route ({route.how}): not the "
                                                           "planned route"))
                continue
            status, finding, supporting = self._assess(ctx, trial, scores)
            evidence.append(Evidence(trial.reference, finding))
            evidence.extend(supporting)
            if status is Status.UNKNOWN:
                gaps.append(Gap(f"pain scores on the same scale before and after the temporary trial {trial.reference} "
                                f"({finding})", "document pain scores before and after the trial", "trial"))
            statuses.append(status)
        if not planned and Status.MET in statuses:
            return Result(Status.UNKNOWN, evidence, route_gap, notes)
        if Status.MET in statuses:
            return Result(Status.MET, evidence, notes=notes)
        if statuses and all(s is Status.NOT_MET for s in statuses):
            return Result(Status.NOT_MET, evidence, notes=notes, failure=Failure(
                f"temporary trial did not reduce pain by more than {percent}",
                f"The temporary trial by the {routes_words} route did not reduce pain by more than {percent} on the "
                "same scale; the policy requires a successful trial."))
        if not statuses:
            gaps.insert(0, wanted)
        return Result(Status.UNKNOWN, evidence, gaps, notes)

    def _assess(self, ctx: EvaluationContext, trial: _Trial,
                scores: ScoreIndex) -> tuple[Status, str, list[Evidence]]:
        if trial.start is None:
            return Status.UNKNOWN, f"trial '{trial.label}' has no date, so no baseline score can be found", []
        end = (trial.end or trial.start) + self.window
        part = [s for ref in trial.parts for s in scores.part_of(ref)]
        results = list({id(s): s for s in [*part, *scores.between(trial.start, end)]}.values())
        if not results:
            return Status.UNKNOWN, f"trial '{trial.label}' has no pain score during or after it", []
        dropped: set[int] = set()
        for _ in range(_MAX_RETRIES):
            best = self._best(trial, scores, results, dropped)
            if best is None:
                break
            _, baseline, result = best
            invalid = [s for s in (baseline, result) if ctx.validated(s.raw) is None]
            if not invalid:
                return self._judged(trial, best)
            dropped.update(id(s) for s in invalid)
        return Status.UNKNOWN, f"trial '{trial.label}' has no baseline pain score on the same scale before it", []

    def _best(self, trial: _Trial, scores: ScoreIndex, results: list[PainScore],
              dropped: set[int]) -> tuple[Decimal, PainScore, PainScore] | None:
        """The largest reduction from the last score before the trial to a score during or after it."""
        assert trial.start is not None
        in_trial = {id(s) for s in results} | dropped
        best: tuple[Decimal, PainScore, PainScore] | None = None
        baselines: dict[str, PainScore | None] = {}
        for result in results:
            if id(result) in dropped:
                continue
            if result.code not in baselines:
                baselines[result.code] = scores.last_before(result.code, trial.start, in_trial)
            baseline = baselines[result.code]
            if baseline is None or baseline.value <= 0:
                continue
            reduction = (baseline.value - result.value) / baseline.value
            if best is None or reduction > best[0]:
                best = (reduction, baseline, result)
        return best

    def _judged(self, trial: _Trial, best: tuple[Decimal, PainScore, PainScore]) -> tuple[Status, str, list[Evidence]]:
        reduction, baseline, result = best
        percent = f"{(reduction * 100).quantize(Decimal('0.1'))}%"
        supporting = [
            Evidence(baseline.reference, f"baseline pain score {baseline.value} ({baseline.code})"),
            Evidence(result.reference, f"pain score {result.value} during/after the trial ({result.code})"),
        ]
        route = trial.route.words if trial.route else "unknown"
        if reduction > self.threshold:
            return Status.MET, f"trial '{trial.label}' by the {route} route reduced pain by {percent}", supporting
        return (Status.NOT_MET, f"trial '{trial.label}' by the {route} route reduced pain by {percent}, not more than "
                f"{self.threshold * 100:.0f}%", supporting)
