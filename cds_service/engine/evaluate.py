"""Deciding one draft order under one policy: find the indication, try the rules in order, and
turn the answers of their criteria into a traceable :class:`Decision`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..fhir.record import PatientRecord
from ..terminology import Concept
from .context import EvaluationContext, Indication, reference_of
from .criteria import evaluate_all
from .decision import CriterionTrace, Decision, Evidence, Outcome, Result, RuleTrace, Status
from .orders import OrderFacts
from .policy import Policy, PolicySet, Rule, Trigger

INDICATION_MISSING = "indication-missing"
INDICATION_AMBIGUOUS = "indication-ambiguous"
NO_RULE = "no-rule-applies"
DATA_UNAVAILABLE = "data-unavailable"


@dataclass
class _RuleResult:
    rule: Rule | None
    outcome: Outcome
    evidence: list[Evidence] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    trace: list[RuleTrace] = field(default_factory=list)
    indication: Indication | None = None


def _trace(phase: str, criteria: Sequence[object], result: Result, trace: RuleTrace) -> None:
    trace.criteria.append(CriterionTrace(
        kind=",".join(getattr(c, "kind", "?") for c in criteria) or "(always)",
        status=result.status,
        phase=phase,
        notes=tuple(result.notes),
    ))


def _run_rules(policy: Policy, ctx: EvaluationContext) -> _RuleResult:
    traces: list[RuleTrace] = []
    for rule in policy.rules:
        if ctx.indication is None and rule.needs_indication:
            if not rule.when:
                break
            continue
        trace = RuleTrace(rule.id, applied=False)
        traces.append(trace)
        gate = evaluate_all(rule.when, ctx)
        _trace("when", rule.when, gate, trace)
        if gate.status is not Status.MET:
            continue
        trace.applied = True
        need = evaluate_all(rule.require, ctx)
        if rule.require:
            _trace("require", rule.require, need, trace)
        if need.status is Status.MET:
            outcome = rule.outcome
        elif need.status is Status.NOT_MET:
            outcome = rule.if_not_met
        else:
            outcome = Outcome.CONDITIONAL
        missing = list(need.missing) if need.status is Status.UNKNOWN else []
        if outcome is Outcome.CONDITIONAL:
            missing.extend(rule.missing)
        return _RuleResult(rule, outcome, [*gate.evidence, *need.evidence], missing,
                           [*gate.notes, *need.notes], traces, ctx.indication)
    if ctx.indication is None:
        return _RuleResult(None, Outcome.CONDITIONAL, missing=[policy.missing_indication], trace=traces)
    return _RuleResult(None, Outcome.OUT_OF_SCOPE, trace=traces, indication=ctx.indication)


def indication_candidates(policy: Policy, ctx: EvaluationContext) -> tuple[list[Indication], list[str]]:
    """The order's own reasons (reasonCode and resolved reasonReference) as one indication; without
    them, each active problem-list diagnosis that the policy recognises."""
    notes: list[str] = []
    order = ctx.order
    concepts = list(order.reasons)
    refs = []
    for ref in order.reason_references:
        resource = ctx.record.resolve(ref)
        ctx.record.consulted.add("Condition")
        if resource is not None and resource.get_resource_type() == "Condition":
            concepts.append(ctx.concept(resource.code))
            refs.append(reference_of(resource))
        else:
            notes.append(f"reasonReference {ref} could not be resolved to a Condition")
    if concepts:
        source = "order reasonCode" if not refs else "order reason"
        reference = ", ".join([order.reference, *refs])
        return [Indication(Concept.merge(concepts), source, reference)], notes
    candidates: list[Indication] = []
    seen: set[tuple[tuple[str, str], ...]] = set()
    for condition, concept in ctx.active_conditions():
        if not any(vs.match(concept) for vs in policy.recognised):
            continue
        key = tuple(sorted((c.system, c.code) for c in concept.codings))
        if key in seen:
            continue
        seen.add(key)
        candidates.append(Indication(concept, "active problem list", reference_of(condition)))
    return candidates, notes


def _describe(result: _RuleResult) -> str:
    label = result.indication.concept.label() if result.indication else "no indication"
    rule = result.rule.id if result.rule else "none"
    return f"'{label}' leads to {result.outcome.value} (rule {rule})"


def decide(policy_set: PolicySet, policy: Policy, trigger: Trigger, how: str, order: OrderFacts,
           draft_orders: Sequence[OrderFacts], record: PatientRecord) -> Decision:
    record.consulted = set()
    ctx = EvaluationContext(
        systems=policy_set.systems,
        value_sets=policy.value_sets,
        order=order,
        draft_orders=draft_orders,
        record=record,
        indication=None,
        implied_route=trigger.route,
    )
    candidates, notes = indication_candidates(policy, ctx)
    results = []
    options: list[Indication | None] = list(candidates) or [None]
    for candidate in options:
        ctx.indication = candidate
        results.append(_run_rules(policy, ctx))
    first = results[0]
    order_evidence = Evidence(order.reference, f"{trigger.label} order [{how}]")
    if len({(r.outcome, r.rule.id if r.rule else None) for r in results}) == 1 or all(
        r.outcome is results[0].outcome and r.outcome is not Outcome.CONDITIONAL for r in results
    ):
        chosen = first
        rule_id = first.rule.id if first.rule else (INDICATION_MISSING if candidates == [] else NO_RULE)
        if len(results) > 1:
            notes.append("other problem-list indications lead to the same outcome: "
                         + "; ".join(_describe(r) for r in results[1:]))
        evidence = [order_evidence, *chosen.evidence]
        missing = chosen.missing
        outcome = chosen.outcome
        rule = chosen.rule
    else:
        rule = None
        rule_id = INDICATION_AMBIGUOUS
        outcome = Outcome.CONDITIONAL
        chosen = _RuleResult(None, outcome)
        evidence = [order_evidence, *(e for r in results for e in r.evidence)]
        missing = ["the indication for this order (reasonCode): the problem list supports more than one, "
                   "with different outcomes: " + "; ".join(_describe(r) for r in results)]
    trace = [t for r in results for t in r.trace]
    notes.extend(n for r in results for n in r.notes)
    technical = record.technical_gaps()
    if technical:
        notes.append(f"from the data that could be read, the rules gave: {outcome.value} (rule {rule_id})")
        outcome = Outcome.CONDITIONAL
        rule_id = DATA_UNAVAILABLE
        missing = [f"{rtype} data could not be read ({why})" for rtype, why in sorted(technical.items())]
        rule = None
    if rule is not None:
        clause, reason, summary = rule.clause, rule.reason(outcome), rule.summary(outcome)
    elif rule_id == INDICATION_MISSING:
        clause = "The policy applies according to the indication for the order."
        reason = f"The {policy.id} decision needs {policy.missing_indication}."
        summary = "indication for the order is not documented"
    elif rule_id == INDICATION_AMBIGUOUS:
        clause = "The policy applies according to the indication for the order."
        reason = "The order states no reason, and the patient's active problems lead to different decisions."
        summary = "state the indication for the order"
    elif rule_id == DATA_UNAVAILABLE:
        clause = "Coverage cannot be determined from data that could not be read."
        reason = "Patient data the decision depends on could not be read from the EHR; coverage is not determined."
        summary = "patient data could not be read; coverage not determined"
    else:
        clause = "No rule of the policy applies to this order."
        reason = "No rule of the policy applies."
        summary = ""
    return Decision(
        policy_id=policy.id,
        policy_title=policy.title,
        order_reference=order.reference,
        outcome=outcome,
        rule_id=rule_id,
        clause=clause,
        reason=reason,
        summary=summary.replace("{drug}", trigger.label),
        evidence=evidence,
        missing=missing,
        notes=notes,
        indication=chosen.indication.concept.label() if chosen.indication else None,
        technical=technical,
        trace=trace,
        skipped_resources=[f"{s.reference}: {s.reason}" for s in record.skipped],
    )
