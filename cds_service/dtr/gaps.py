"""Which kinds of missing facts a policy can report, read from the policy itself (its rules' ``require``
criteria, its conditional rules, and the engine's own outcomes), so that a form can be checked to ask for
every one of them.

Only ``require`` criteria report what is missing (a ``when`` that cannot be decided just means the rule does
not apply). Each criterion kind reports fixed kinds of gaps (:data:`REPORTS`); a criterion kind missing there
is itself a problem the checker names, so that a new kind of criterion cannot slip past the forms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..engine.criteria import Criterion, walk
from ..engine.policy import Policy


@dataclass(frozen=True, order=True)
class GapKey:
    """A kind of missing fact: the gap kind, the value sets it concerns, the rule that reports it (None: the
    engine itself)."""

    kind: str
    about: str | None = None
    rule: str | None = None

    def __str__(self) -> str:
        return self.kind + (f":{self.about}" if self.about else "") + (f"@{self.rule}" if self.rule else "")


def _names(criterion: Any, attribute: str) -> str:
    value = getattr(criterion, attribute)
    sets = value if isinstance(value, list | tuple) else [value]
    return "+".join(vs.name for vs in sets)


#: per criterion kind: the (gap kind, about) pairs it can report when it cannot decide
REPORTS: dict[str, Callable[[Any], list[tuple[str, str | None]]]] = {
    "indication_in": lambda c: [("indication", None)],
    "condition": lambda c: [("diagnosis", _names(c, "sets")), ("diagnosis-confirmation", _names(c, "sets"))],
    "order_code_in": lambda c: [],
    "existing_device": lambda c: [],
    "order_route_in": lambda c: [("route", None)],
    "pump_drug_approved": lambda c: [("pump-drug", None), ("indication", None)],
    "pump_drug_in": lambda c: [],
    "temporary_trial": lambda c: [("trial", None), ("pump-drug", None)],
    "drug_failure": lambda c: [("drug-failure", _names(c, "drug"))],
    "pain_is_chronic": lambda c: [("indication", None), ("pain-duration", None)],
    "pain_is_severe": lambda c: [("pain-severity", None)],
    "any_of": lambda c: [],
    "all_of": lambda c: [],
    "not": lambda c: [],
}


class UnknownCriterion(ValueError):
    """A criterion kind whose gaps the checker does not know."""


def _criterion_gaps(criterion: Criterion) -> list[tuple[str, str | None]]:
    report = REPORTS.get(criterion.kind)
    if report is None:
        raise UnknownCriterion(f"criterion kind {criterion.kind!r}: which missing facts it reports is not known "
                               "(add it to cds_service/dtr/gaps.py REPORTS)")
    return report(criterion)


def emitted_gaps(policy: Policy) -> set[GapKey]:
    """Every kind of missing fact ``policy`` can report (see the module's description)."""
    keys: set[GapKey] = {GapKey("indication"), GapKey("indication-coding"), GapKey("diagnosis-confirmation"),
                         GapKey("technical")}
    if any(t.unidentified_drug_route is not None for t in policy.triggers):
        keys.add(GapKey("drug"))
    for rule in policy.rules:
        for top in rule.require:
            for criterion in walk(top):
                keys.update(GapKey(kind, about, rule.id) for kind, about in _criterion_gaps(criterion))
        if rule.missing:
            keys.add(GapKey(rule.gap_kind, None, rule.id))
    return keys
