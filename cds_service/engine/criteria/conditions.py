"""Criteria on diagnoses and on the order itself: the indication, a diagnosis on record (with the clinical
statuses the criterion accepts), the order's code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ...terminology import Concept, ValueSet
from ..context import STATUS_RULES, EvaluationContext
from ..decision import Evidence, Gap, Result
from .base import Criterion, CriterionError, Lookup, check_keys, one_value_set, value_sets


class IndicationIn(Criterion):
    """The indication under consideration is in one of the value sets."""

    kind = "indication_in"
    uses_indication = True

    def __init__(self, params: Any, lookup: Lookup) -> None:
        self.sets = value_sets(lookup, params, self.kind)

    def _evaluate(self, ctx: EvaluationContext) -> Result:
        indication = ctx.indication
        if indication is None:
            return Result.unknown(Gap("the indication for the order", None, "indication"))
        for vs in self.sets:
            found = ctx.find(vs, indication.concept)
            if found is not None:
                return Result.met(Evidence(indication.reference,
                                           f"indication '{indication.label()}' ({indication.source}) "
                                           f"is {vs.title} [{found.how}]"))
        return Result.not_met()


class ConditionIn(Criterion):
    """A diagnosis in the value sets, on the order (reasonCode: current by definition) or on record, counting
    under the criterion's status rule (``current``: the order's indication must be; ``history``: the origin of
    a condition may be resolved or in remission). A provisional or differential diagnosis is a question:
    unknown, asking to confirm it."""

    kind = "condition"
    reads = ("Condition",)

    def __init__(self, params: Any, lookup: Lookup) -> None:
        p = check_keys(self.kind, params, {"in"}, {"status"})
        self.sets = value_sets(lookup, p, "in")
        self.status = p.get("status", "current")
        if self.status not in STATUS_RULES:
            raise CriterionError(f"{self.kind}: status must be one of {list(STATUS_RULES)}")
        self.title = " or ".join(vs.title for vs in self.sets)

    def _evaluate(self, ctx: EvaluationContext) -> Result:
        for reason in ctx.order.reasons:
            for vs in self.sets:
                found = ctx.find(vs, reason)
                if found is not None:
                    if found.via_text:
                        ctx.scope.read_text(f"order reason text '{reason.label()}'")
                    return Result.met(Evidence(ctx.order.reference,
                                               f"order reason '{reason.label()}' is {vs.title} [{found.how}]"))
        questions: list[Evidence] = []
        for counted in ctx.conditions(self.status):
            for vs in self.sets:
                found = ctx.find(vs, counted.concept)
                if found is None:
                    continue
                finding = f"condition '{counted.concept.label()}' is {vs.title} [{found.how}]"
                if counted.question:
                    questions.append(Evidence(counted.reference, f"{finding}, recorded as {counted.question}"))
                    break
                if found.via_text:
                    ctx.scope.read_text(f"condition text '{counted.concept.label()}'")
                return Result.met(Evidence(counted.reference, finding))
        about = "+".join(vs.name for vs in self.sets)
        if questions:
            return Result.unknown(Gap(f"confirmation of the diagnosis of {self.title} (it is recorded as provisional "
                                      "or differential)", "confirm the diagnosis", "diagnosis-confirmation", about),
                                  *questions)
        which = "a current diagnosis" if self.status == "current" else "a diagnosis"
        return Result.unknown(Gap(f"{which} of {self.title}", None, "diagnosis", about))

    def searches(self) -> Mapping[str, Sequence[ValueSet] | None]:
        return {"Condition": None}


class OrderCodeIn(Criterion):
    """The order's code (or, for a drug order, its drug) is in the value set."""

    kind = "order_code_in"

    def __init__(self, params: Any, lookup: Lookup) -> None:
        self.value_set = one_value_set(lookup, params, self.kind)

    def _evaluate(self, ctx: EvaluationContext) -> Result:
        for concept in ctx.order.concepts():
            found = self.value_set.find(concept)
            if found is not None:
                return Result.met(Evidence(ctx.order.reference,
                                           f"the order '{concept.label()}' is {self.value_set.title} [{found.how}]"))
        return Result.not_met()


class ExistingDevice(Criterion):
    """The patient already has the device in use: a completed implantation procedure, an active Device of the
    kind, a diagnosis or status code that says so, or an order reason that describes the device in use (a
    mechanical reason on a replacement order). Never unknown: without such evidence the order is read as a
    first implantation."""

    kind = "existing_device"
    reads = ("Procedure", "Device", "Condition")

    def __init__(self, params: Any, lookup: Lookup) -> None:
        p = check_keys(self.kind, params, {"procedures", "devices", "conditions"}, {"order_reasons", "label"})
        self.procedures = one_value_set(lookup, p, "procedures")
        self.devices = one_value_set(lookup, p, "devices")
        self.conditions = one_value_set(lookup, p, "conditions")
        self.order_reasons = one_value_set(lookup, p, "order_reasons") if "order_reasons" in p else None
        self.label = str(p.get("label", "the device"))

    def _evaluate(self, ctx: EvaluationContext) -> Result:
        if self.order_reasons is not None:
            for reason in [*ctx.order.reasons, *(Concept((), n) for n in ctx.order.notes)]:
                found = self.order_reasons.find(reason)
                if found is not None:
                    if found.via_text:
                        ctx.scope.read_text(f"order reason text '{reason.label()}'")
                    return Result.met(Evidence(ctx.order.reference,
                                               f"the order's reason '{reason.label()}' describes {self.label} in "
                                               f"use [{found.how}]"))
        for raw, model in ctx.history("Procedure"):
            if raw.get("status") != "completed":
                continue
            concept = ctx.concept(model.code)
            found = self.procedures.find(concept)
            if found is not None:
                return Result.met(Evidence(f"Procedure/{model.id}",
                                           f"{self.label} implanted before: '{concept.label()}' [{found.how}]"))
        for raw, model in ctx.history("Device"):
            if raw.get("status") not in (None, "active"):
                continue
            concept = ctx.concept(model.type)
            found = self.devices.find(concept)
            if found is not None:
                return Result.met(Evidence(f"Device/{model.id}", f"{self.label} in use: '{concept.label()}' "
                                                                  f"[{found.how}]"))
        for counted in ctx.conditions("history"):
            found = ctx.find(self.conditions, counted.concept)
            if found is not None and not counted.question:
                return Result.met(Evidence(counted.reference, f"'{counted.concept.label()}' shows {self.label} in "
                                                              f"use [{found.how}]"))
        return Result.not_met(notes=[f"no record of {self.label} in use: read as a first implantation"])

    def searches(self) -> Mapping[str, Sequence[ValueSet] | None]:
        return {"Procedure": [self.procedures], "Device": None, "Condition": None}
