"""Pain scores read from the record's Observations, indexed for the trial and severity criteria.

Observations are read as JSON and validated only when chosen as evidence (a record may hold many); they are
sorted once per decision, so that finding the baseline before a trial or the results within a window costs
a binary search, whatever the number of scores.
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from ...terminology import ValueSet
from ..context import EvaluationContext, raw_reference
from ..dates import as_utc

FINAL = frozenset({"final", "amended", "corrected"})


@dataclass(eq=False)
class PainScore:
    reference: str
    code: str
    value: Decimal
    when: dt.datetime | None
    part_of: frozenset[str]
    raw: Mapping[str, Any]

    @property
    def on_ten(self) -> Decimal:
        """The score on a 0-10 scale (a 0-100 visual analogue score is divided by ten)."""
        return self.value / 10 if self.value > 10 else self.value


def _number(raw: Mapping[str, Any]) -> Decimal | None:
    quantity = raw.get("valueQuantity")
    value = quantity.get("value") if isinstance(quantity, Mapping) else raw.get("valueInteger")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return None
    return number if number.is_finite() and 0 <= number <= 100 else None


def _references(raw: Mapping[str, Any], key: str) -> frozenset[str]:
    items = raw.get(key)
    if not isinstance(items, list):
        return frozenset()
    return frozenset(str(r["reference"]) for r in items[:50]
                     if isinstance(r, Mapping) and isinstance(r.get("reference"), str))


def _when(score: PainScore) -> dt.datetime:
    assert score.when is not None  # only dated scores are indexed by time
    return score.when


@dataclass
class ScoreIndex:
    """Scores by time (undated ones apart), by code, and by the procedure they are part of."""

    dated: list[PainScore] = field(default_factory=list)
    by_code: dict[str, list[PainScore]] = field(default_factory=dict)
    by_part: dict[str, list[PainScore]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._times = [_when(s) for s in self.dated]
        self._code_times = {code: [_when(s) for s in items] for code, items in self.by_code.items()}

    def between(self, start: dt.datetime, end: dt.datetime) -> list[PainScore]:
        return self.dated[bisect.bisect_left(self._times, start):bisect.bisect_right(self._times, end)]

    def last_before(self, code: str, moment: dt.datetime, excluded: set[int]) -> PainScore | None:
        items = self.by_code.get(code, [])
        index = bisect.bisect_left(self._code_times.get(code, []), moment)
        while index > 0:
            index -= 1
            if id(items[index]) not in excluded:
                return items[index]
        return None

    def part_of(self, reference: str) -> list[PainScore]:
        found = self.by_part.get(reference, [])
        tail = reference.rsplit("/", 2)
        if not found and len(tail) >= 2:
            found = self.by_part.get(f"{tail[-2]}/{tail[-1]}", [])
        return found


def pain_scores(ctx: EvaluationContext, value_set: ValueSet) -> ScoreIndex:
    """The final, numeric pain scores in ``value_set``, read once per decision."""
    key = f"pain-scores:{value_set.name}"
    if key in ctx.scope.memo:
        return ctx.scope.memo[key]  # type: ignore[no-any-return]
    dated: list[PainScore] = []
    by_part: dict[str, list[PainScore]] = {}
    for raw in ctx.raw_resources("Observation"):
        if str(raw.get("status")) not in FINAL:  # str(): any JSON value, hashable
            continue
        coding = value_set.first_match(ctx.systems.concept(raw.get("code")).codings)
        value = _number(raw)
        if coding is None or value is None:
            continue
        period = raw.get("effectivePeriod")
        when = as_utc(raw.get("effectiveDateTime")) or (
            as_utc(period.get("start")) if isinstance(period, Mapping) else None)
        score = PainScore(raw_reference(raw), coding.code, value, when, _references(raw, "partOf"), raw)
        for part in score.part_of:
            by_part.setdefault(part, []).append(score)
            tail = part.rsplit("/", 2)
            if len(tail) >= 2 and f"{tail[-2]}/{tail[-1]}" != part:
                by_part.setdefault(f"{tail[-2]}/{tail[-1]}", []).append(score)
        if when is not None:
            dated.append(score)
    dated.sort(key=_when)
    by_code: dict[str, list[PainScore]] = {}
    for score in dated:
        by_code.setdefault(score.code, []).append(score)
    index = ScoreIndex(dated, by_code, by_part)
    ctx.scope.memo[key] = index
    return index
