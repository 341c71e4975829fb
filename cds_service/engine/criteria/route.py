"""Routes of administration, and how strongly the record shows them.

The most specific evidence wins: a route coded on the order or administration (strength 3) beats a route
written in its text (2), which beats a route implied by a procedure or product code (1). Evidence that names
two routes at its strongest level proves neither (a CPT code for an "epidural or subarachnoid" injection
does not show which it was).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...terminology import Concept, ValueSet
from ..context import EvaluationContext
from ..decision import Evidence, Gap, Result
from .base import Criterion, Lookup, check_keys, one_value_set, value_sets

CODED, WRITTEN, IMPLIED = 3, 2, 1


@dataclass(frozen=True)
class RouteClue:
    """Something that may show a route: a concept, where it comes from, and how strong a coded match is."""

    concept: Concept
    source: str
    strength: int


@dataclass(frozen=True)
class RouteFinding:
    names: frozenset[str]
    titles: tuple[str, ...]
    how: str
    strength: int
    via_text: bool

    @property
    def ambiguous(self) -> bool:
        return len(self.names) > 1

    @property
    def words(self) -> str:
        return " or ".join(self.titles)


def find_route(route_sets: Sequence[ValueSet], clues: Sequence[RouteClue]) -> RouteFinding | None:
    """The routes the strongest evidence shows (several: ambiguous), or None when nothing shows one."""
    found: dict[int, dict[str, tuple[ValueSet, str, bool]]] = {}
    for clue in clues:
        for vs in route_sets:
            match = vs.find(clue.concept)
            if match is None:
                continue
            strength = clue.strength if not match.via_text else min(clue.strength, WRITTEN)
            found.setdefault(strength, {}).setdefault(
                vs.name, (vs, f"{clue.source} '{clue.concept.label()}' [{match.how}]", match.via_text))
    if not found:
        return None
    best = max(found)
    items = list(found[best].values())
    return RouteFinding(
        names=frozenset(vs.name for vs, _, _ in items),
        titles=tuple(vs.title for vs, _, _ in items),
        how="; ".join(how for _, how, _ in items),
        strength=best,
        via_text=all(text for _, _, text in items),
    )


def order_route_clues(order: Any) -> list[RouteClue]:
    """What shows a draft order's route: coded routes (and their text), dosage or instruction text, details
    (a method or a device parameter), and last the product's own name (a patch, an oral tablet)."""
    clues = [RouteClue(r, "route", CODED) for r in order.routes]
    clues += [RouteClue(Concept((), t), "dosage text", WRITTEN) for t in order.route_texts]
    clues += [RouteClue(d, "order detail", CODED) for d in order.details]
    clues += [RouteClue(Concept((), c.text) if not c.codings else c, "product", IMPLIED) for c in order.concepts()]
    return clues


class OrderRouteIn(Criterion):
    """The order's route is in the value set; not met when it is shown to be one of ``others`` (coded, or
    written: "by mouth", "patch"...); met when the trigger's order code implies the route (an IV infusion
    code); unknown when nothing shows the route."""

    kind = "order_route_in"

    def __init__(self, params: Any, lookup: Lookup) -> None:
        if isinstance(params, str):
            params = {"route": params}
        p = check_keys(self.kind, params, {"route"}, {"others"})
        self.route = one_value_set(lookup, p, "route")
        self.others = value_sets(lookup, p, "others") if "others" in p else []

    def _evaluate(self, ctx: EvaluationContext) -> Result:
        order = ctx.order
        if ctx.implied_route == self.route.name:
            return Result.met(Evidence(order.reference, f"the order code implies the {self.route.title} route"))
        known = ctx.systems.names()
        coded = [r for r in order.routes if any(c.system in known for c in r.codings)]
        if coded:  # a coded route beats anything written
            labels = ", ".join(r.label() for r in coded)
            for route in coded:
                match = self.route.find(route)
                if match is not None:
                    return Result.met(Evidence(order.reference, f"route {labels} is {self.route.title} [{match.how}]"))
            return Result.not_met(Evidence(order.reference, f"route {labels} is not {self.route.title}"))
        finding = find_route([self.route, *self.others], order_route_clues(order))
        if finding is None or finding.ambiguous:
            return Result.unknown(Gap("the route of administration", "state the route", "route"))
        if finding.via_text:
            ctx.scope.read_text(f"route from text: {finding.how}")
        if self.route.name in finding.names:
            return Result.met(Evidence(order.reference, f"route {self.route.title}: {finding.how}"))
        return Result.not_met(Evidence(order.reference, f"route {finding.words}, not {self.route.title}: "
                                                        f"{finding.how}"))
