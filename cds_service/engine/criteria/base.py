"""What every criterion kind shares: answering met / not met / unknown with evidence, the optional wording a
policy file gives it, and reading its parameters strictly."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol

from ...terminology import ValueSet
from ..context import EvaluationContext
from ..decision import Failure, Gap, Result, Status
from ..spec import strict_keys


class CriterionError(ValueError):
    """A criterion in a policy file is not valid."""


class Lookup(Protocol):
    """How a criterion finds what its parameters name: value sets, named tables of the policy file, and the
    criteria it combines (``any_of``, ``all_of``, ``not``)."""

    def value_set(self, name: str) -> ValueSet: ...

    def table(self, name: str) -> Any: ...

    def criterion(self, spec: Any) -> Criterion: ...


class Criterion:
    """One test a rule makes. Subclasses implement :meth:`_evaluate`; :meth:`evaluate` adds the wording the
    policy file gives (``missing``, ``gap``, ``if_not_met``) and computes, once per decision, the answer of a
    criterion that does not depend on the indication under consideration."""

    kind: ClassVar[str]
    #: resource types (besides the order) that the criterion reads; used to build prefetch templates
    reads: ClassVar[tuple[str, ...]] = ()
    uses_indication: bool = False
    missing_text: str | None = None
    gap_label: str | None = None
    failure: Failure | None = None

    def evaluate(self, ctx: EvaluationContext) -> Result:
        if self.depends_on_indication():
            result = self._evaluate(ctx)
        else:
            cached = ctx.scope.cache.get(id(self))
            if cached is None:
                cached = ctx.scope.cache[id(self)] = self._evaluate(ctx)
            result = cached
        return self._worded(result)

    def _worded(self, result: Result) -> Result:
        if result.status is Status.UNKNOWN and (self.missing_text or self.gap_label):
            if self.missing_text:
                first = result.gaps[0] if result.gaps else Gap("")
                gaps = [Gap(self.missing_text, self.gap_label or first.label, first.kind, first.about)]
            else:
                gaps = [Gap(g.text, g.label or self.gap_label, g.kind, g.about) for g in result.gaps]
            return Result(result.status, result.evidence, gaps, result.notes, result.failure)
        if result.status is Status.NOT_MET and self.failure is not None:
            return Result(result.status, result.evidence, result.gaps, result.notes, self.failure)
        return result

    def depends_on_indication(self) -> bool:
        return self.uses_indication or any(c.depends_on_indication() for c in self.children())

    def _evaluate(self, ctx: EvaluationContext) -> Result:
        raise NotImplementedError

    def children(self) -> Sequence[Criterion]:
        return ()

    def searches(self) -> Mapping[str, Sequence[ValueSet] | None]:
        """Resource types read, each with the value sets its codes are in (None: every resource)."""
        return {t: None for t in self.reads}


def names(params: Any, key: str) -> list[str]:
    """One value-set name or a list of them, as a list."""
    value = params.get(key) if isinstance(params, Mapping) else params
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise CriterionError(f"'{key}' must name a value set or a list of value sets")


def value_sets(lookup: Lookup, params: Any, key: str) -> list[ValueSet]:
    return [lookup.value_set(n) for n in names(params, key)]


def one_value_set(lookup: Lookup, params: Any, key: str) -> ValueSet:
    found = names(params, key)
    if len(found) != 1:
        raise CriterionError(f"'{key}' must name one value set")
    return lookup.value_set(found[0])



def number(params: Mapping[str, Any], key: str, default: float | None, low: float, high: float) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise CriterionError(f"'{key}' must be a number from {low:g} to {high:g}")
    return float(value)


def check_keys(kind: str, params: Any, required: set[str], optional: set[str] = frozenset()) -> Mapping[str, Any]:  # type: ignore[assignment]
    return strict_keys(kind, params, required, set(optional), CriterionError, "parameter(s)")
