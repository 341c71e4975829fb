"""Combining criteria: all of, any of, not."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..context import EvaluationContext
from ..decision import Result, Status
from .base import Criterion, CriterionError, Lookup


def evaluate_all(items: Sequence[Criterion], ctx: EvaluationContext) -> Result:
    """All met: met, with the evidence of all. One not met: not met (it stops there: the outcome is decided).
    Otherwise unknown, with everything that is missing, so that a card can list all of it at once."""
    combined = Result(Status.MET)
    for item in items:
        result = item.evaluate(ctx)
        combined.evidence.extend(result.evidence)
        combined.notes.extend(result.notes)
        if result.status is Status.NOT_MET:
            combined.status = Status.NOT_MET
            combined.failure = result.failure
            return combined
        if result.status is Status.UNKNOWN:
            combined.status = Status.UNKNOWN
            combined.gaps.extend(result.gaps)
    return combined


class Not(Criterion):
    kind = "not"

    def __init__(self, params: Any, lookup: Lookup) -> None:
        self.inner = lookup.criterion(params)

    def children(self) -> Sequence[Criterion]:
        return [self.inner]

    def _evaluate(self, ctx: EvaluationContext) -> Result:
        result = self.inner.evaluate(ctx)
        flipped = {Status.MET: Status.NOT_MET, Status.NOT_MET: Status.MET}.get(result.status, Status.UNKNOWN)
        return Result(flipped, result.evidence, result.gaps, result.notes)


class AnyOf(Criterion):
    """Met when one alternative is met. Otherwise unknown when one is unknown: what is missing is reported from
    the last unknown alternative (write the usual path last), or not met."""

    kind = "any_of"

    def __init__(self, params: Any, lookup: Lookup) -> None:
        if not isinstance(params, list) or not params:
            raise CriterionError(f"{self.kind}: expected a non-empty list of criteria")
        self.items = [lookup.criterion(p) for p in params]

    def children(self) -> Sequence[Criterion]:
        return self.items

    def _evaluate(self, ctx: EvaluationContext) -> Result:
        unknown: Result | None = None
        failure = None
        notes: list[str] = []
        for item in self.items:
            result = item.evaluate(ctx)
            notes.extend(result.notes)
            if result.status is Status.MET:
                return Result(Status.MET, result.evidence, notes=notes)
            if result.status is Status.UNKNOWN:
                unknown = result
            elif failure is None:
                failure = result.failure
        if unknown is not None:
            return Result(Status.UNKNOWN, unknown.evidence, unknown.gaps, notes)
        return Result(Status.NOT_MET, notes=notes, failure=failure)


class AllOf(AnyOf):
    kind = "all_of"

    def _evaluate(self, ctx: EvaluationContext) -> Result:
        return evaluate_all(self.items, ctx)
