"""The criterion kinds that policy files combine. Each reads the evaluation context and answers
met / not met / unknown (evidence missing), with the evidence it used and what is missing.

A criterion never decides coverage: rules do, from the criteria's answers. To add a kind: write a
:class:`Criterion` subclass in a module of this package (its ``kind`` is the key policy files use), add it to
``KINDS`` below, describe it in README's table, and add a scenario that uses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..decision import Failure
from .base import Criterion, CriterionError, Lookup
from .combinators import AllOf, AnyOf, Not, evaluate_all
from .conditions import ConditionIn, ExistingDevice, IndicationIn, OrderCodeIn
from .drug_failure import DrugFailure
from .pain import ChronicPain, PainSeverity
from .pump_drug import ApprovalTable, PumpDrugApproved, PumpDrugIn
from .route import OrderRouteIn
from .trial import TemporaryTrial

KINDS: dict[str, type[Criterion]] = {
    cls.kind: cls
    for cls in (IndicationIn, ConditionIn, OrderCodeIn, ExistingDevice, OrderRouteIn, Not, AnyOf, AllOf,
                PumpDrugApproved, PumpDrugIn, TemporaryTrial, DrugFailure, ChronicPain, PainSeverity)
}
#: keys a criterion may carry besides its kind: how the policy file words it
WORDING = frozenset({"missing", "gap", "if_not_met"})

__all__ = ["KINDS", "ApprovalTable", "Criterion", "CriterionError", "Lookup", "build_criterion", "evaluate_all",
           "walk"]


def _text(kind: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CriterionError(f"{kind}: '{key}' must be text")
    return value.strip()


def build_criterion(spec: Any, lookup: Lookup) -> Criterion:
    """A criterion from its policy-file form: a mapping with one kind key, and optionally its wording:
    ``missing`` (what the card asks for when it is unknown), ``gap`` (a short label for the summary) and
    ``if_not_met`` (``summary`` and ``reason`` when it is not met)."""
    if not isinstance(spec, Mapping):
        raise CriterionError(f"a criterion must be a mapping with one of {sorted(KINDS)}, not {spec!r}")
    kinds = [k for k in spec if k not in WORDING]
    if len(kinds) != 1:
        raise CriterionError(f"a criterion needs exactly one kind (one of {sorted(KINDS)}), got {sorted(kinds)}")
    kind = kinds[0]
    cls = KINDS.get(kind)
    if cls is None:
        raise CriterionError(f"unknown criterion kind {kind!r} (known: {', '.join(sorted(KINDS))})")
    criterion = cls(spec[kind], lookup)  # type: ignore[call-arg]
    if "missing" in spec:
        criterion.missing_text = _text(kind, "missing", spec["missing"])
    if "gap" in spec:
        criterion.gap_label = _text(kind, "gap", spec["gap"])
    if "if_not_met" in spec:
        wording = spec["if_not_met"]
        if not isinstance(wording, Mapping) or set(wording) != {"summary", "reason"}:
            raise CriterionError(f"{kind}: 'if_not_met' must have exactly 'summary' and 'reason'")
        criterion.failure = Failure(_text(kind, "summary", wording["summary"]),
                                    _text(kind, "reason", wording["reason"]))
    return criterion


def walk(criterion: Criterion) -> list[Criterion]:
    out = [criterion]
    for child in criterion.children():
        out.extend(walk(child))
    return out
