"""What makes pain "severe, chronic, intractable" on a chart that rarely says so in one code.

Chronic: the indication is coded as chronic (a chronic pain diagnosis), or the condition began at least N
months before the order (its onset; or it was recorded that long ago and is still current). Coded as acute,
or begun less than N months before: not chronic.
Severe and intractable: a code or statement saying so on the indication, or a pain score at or above the
severe threshold within the window before the order (a severe score on a chronic condition is pain that
persisted at that level despite the care given so far: the policy file says why it reads it so). Scores below
the threshold do not show it, but they do not prove the pain is not severe: that stays a question.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from ...terminology import Concept, ValueSet
from ..context import EvaluationContext, Indication
from ..dates import as_utc, months_before
from ..decision import Evidence, Failure, Gap, Result
from .base import Criterion, Lookup, check_keys, number, one_value_set
from .scores import pain_scores

#: the most recent severe scores tried as evidence (each is validated); invalid ones beyond do not count
_MAX_VALIDATED = 20


def _related_conditions(ctx: EvaluationContext, indication: Indication) -> list[Any]:
    """The indication's own Condition, else current Conditions on record sharing one of its codings."""
    if indication.condition is not None:
        return [indication.condition]
    codings = {(c.system, c.code) for c in indication.full.codings}
    return [c.resource for c in ctx.conditions("current")
            if not c.question and codings & {(x.system, x.code) for x in c.concept.codings}]


class ChronicPain(Criterion):
    kind = "pain_is_chronic"
    uses_indication = True
    reads = ("Condition",)

    def __init__(self, params: Any, lookup: Lookup) -> None:
        p = check_keys(self.kind, params, {"chronic", "acute", "months"})
        self.chronic = one_value_set(lookup, p, "chronic")
        self.acute = one_value_set(lookup, p, "acute")
        self.months = int(number(p, "months", 3, 1, 24))

    def _evaluate(self, ctx: EvaluationContext) -> Result:
        indication = ctx.indication
        if indication is None:
            return Result.unknown(Gap("the indication for the order", None, "indication"))
        concepts = [indication.concept, indication.full]
        for vs, verdict in ((self.chronic, True), (self.acute, False)):
            found = next((f for f in (vs.find(c) for c in concepts) if f), None)
            if found is None:
                continue
            if found.via_text:
                ctx.scope.read_text(f"{indication.reference}: '{indication.full.label()}' read as {vs.title}")
            evidence = Evidence(indication.reference, f"'{indication.label()}' is {vs.title} [{found.how}]")
            if verdict:
                # the indication's own coding, already shown as evidence when it was placed, needs no second line
                own = found.coding is not None and found.coding in indication.concept.codings
                return Result.met() if own else Result.met(evidence)
            return Result.not_met(evidence, failure=Failure(
                "acute pain is not chronic pain",
                f"The indication is {vs.title}; the policy covers a pump only for severe, chronic, intractable pain."))
        cutoff = months_before(ctx.order_date, self.months)
        for condition in _related_conditions(ctx, indication):
            ref = f"Condition/{condition.id}"
            onset = ctx.onset(condition)
            if onset is not None:
                if onset <= cutoff:
                    return Result.met(Evidence(ref, f"began {onset.date().isoformat()}, at least {self.months} months "
                                                    "before the order: chronic"))
                return Result.not_met(Evidence(ref, f"began {onset.date().isoformat()}, less than {self.months} "
                                                    "months before the order"), failure=Failure(
                    f"pain of less than {self.months} months is not chronic",
                    f"The pain began less than {self.months} months before the order; the policy covers a pump only "
                    "for severe, chronic, intractable pain."))
            recorded = _recorded(condition)
            if recorded is not None and recorded <= cutoff:
                return Result.met(Evidence(ref, f"recorded {recorded.date().isoformat()} and still current: present "
                                                f"for at least {self.months} months"))
        return Result.unknown(Gap(f"how long the pain has lasted (its onset date; chronic means at least "
                                  f"{self.months} months)", "document how long the pain has lasted", "pain-duration"))


def _recorded(condition: Any) -> dt.datetime | None:
    return as_utc(getattr(condition, "recordedDate", None))


class PainSeverity(Criterion):
    kind = "pain_is_severe"
    uses_indication = True
    reads = ("Condition", "Observation")

    def __init__(self, params: Any, lookup: Lookup) -> None:
        p = check_keys(self.kind, params, {"scores", "severe_at_least", "statements"}, {"within_months"})
        self.scores = one_value_set(lookup, p, "scores")
        self.statements = one_value_set(lookup, p, "statements")
        self.threshold = Decimal(str(number(p, "severe_at_least", None, 1, 10))).normalize()
        self.months = int(number(p, "within_months", 12, 1, 60))

    def searches(self) -> Mapping[str, Sequence[ValueSet] | None]:
        return {"Condition": None, "Observation": [self.scores]}

    def _evaluate(self, ctx: EvaluationContext) -> Result:
        indication = ctx.indication
        if indication is not None:
            conditions = _related_conditions(ctx, indication)
            concepts = [indication.concept, indication.full]
            for condition in conditions:
                concepts.append(ctx.concept(condition.severity))
                concepts += [Concept((), n.text) for n in condition.note or [] if n.text]
            for concept in concepts:
                found = self.statements.find(concept)
                if found is not None:
                    if found.via_text:
                        ctx.scope.read_text(f"{indication.reference}: '{concept.label()}' read as "
                                            f"{self.statements.title}")
                    return Result.met(Evidence(indication.reference,
                                               f"'{concept.label()}' is {self.statements.title} [{found.how}]"))
        end = ctx.order_date
        start = months_before(end, self.months)
        recent = pain_scores(ctx, self.scores).between(start, end)
        severe = [s for s in recent if s.on_ten >= self.threshold]
        for score in list(reversed(severe))[:_MAX_VALIDATED]:
            if ctx.validated(score.raw) is not None:
                return Result.met(Evidence(score.reference, f"pain score {score.value} ({score.code}) on "
                                                            f"{score.when.date().isoformat() if score.when else '?'}: "
                                                            f"severe (at least {self.threshold} of 10)"))
        latest = f" (the highest recent score is {max(s.on_ten for s in recent)} of 10)" if recent else ""
        return Result.unknown(Gap(f"documentation that the pain is severe and intractable: a pain score of at least "
                                  f"{self.threshold} of 10 within {self.months} months before the order, or a "
                                  f"diagnosis or statement saying so{latest}", "document pain severity",
                                  "pain-severity"))
