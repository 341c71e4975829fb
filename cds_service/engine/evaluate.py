"""Deciding one draft order under one policy: find the candidate indications, try the rules in order for
each, reconcile their answers, and turn them into a traceable :class:`Decision`.

Several candidates that lead to the same answer give that answer; candidates that lead to different answers
are a question for the clinician (conditional, naming them), never the more favourable answer. An indication
read only from text, or a diagnosis recorded as provisional, never gives a firm answer: the decision is
conditional and asks for the code or the confirmation. Patient data that could not be read makes a decision
that consulted it conditional too.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ..fhir.record import PatientRecord
from .context import DecisionScope, EvaluationContext, Indication
from .criteria import evaluate_all
from .decision import CriterionTrace, Decision, Evidence, Failure, Gap, Outcome, Result, RuleTrace, Status, unique
from .indication import Candidates, indication_candidates
from .orders import Medications, OrderFacts
from .policy import (
    DATA_UNAVAILABLE,
    DIAGNOSIS_UNCONFIRMED,
    DOCUMENTATION_CONFLICT,
    DRUG_UNIDENTIFIED,
    INDICATION_AMBIGUOUS,
    INDICATION_CONFLICT,
    INDICATION_MISSING,
    INDICATION_UNCODED,
    NO_RULE,
    Policy,
    PolicySet,
    Rule,
    TriggerMatch,
)

_OUTCOME_WORDS = {Outcome.COVERED: "covered", Outcome.NOT_COVERED: "not covered",
                  Outcome.CONDITIONAL: "conditional", Outcome.OUT_OF_SCOPE: "outside the policy"}


@dataclass
class _RuleResult:
    """What the rules gave for one candidate indication."""

    rule: Rule | None
    outcome: Outcome
    evidence: list[Evidence] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    trace: list[RuleTrace] = field(default_factory=list)
    indication: Indication | None = None
    failure: Failure | None = None
    engine: str | None = None  # the engine's own outcome (outcomes.yaml) when no rule decided

    @property
    def key(self) -> tuple[Outcome, str]:
        return self.outcome, self.rule.id if self.rule else (self.engine or NO_RULE)

    def describe(self) -> str:
        label = f"'{self.indication.label()}'" if self.indication else "no indication"
        words = _OUTCOME_WORDS[self.outcome]
        if self.outcome is Outcome.CONDITIONAL and self.gaps:
            needs = "; ".join(unique([g.label or g.text for g in self.gaps]))
            return f"{label}: {words} ({needs})"
        if self.outcome is Outcome.NOT_COVERED and self.failure is not None:
            return f"{label}: {words} ({self.failure.summary})"
        rule = self.rule.summary(self.outcome) if self.rule else ""
        return f"{label}: {words}" + (f" ({rule})" if rule else "")


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
        trace = RuleTrace(rule.id, applied=False, indication=ctx.indication.label() if ctx.indication else None)
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
        gaps = list(need.gaps) if need.status is Status.UNKNOWN else []
        if outcome is Outcome.CONDITIONAL:
            gaps.extend(Gap(m, None, rule.gap_kind) for m in rule.missing)
        failure = need.failure if need.status is Status.NOT_MET else None
        return _RuleResult(rule, outcome, [*gate.evidence, *need.evidence], gaps, [*gate.notes, *need.notes],
                           traces, ctx.indication, failure)
    if ctx.indication is None:
        gap = Gap(policy.missing_indication, "document the indication", "indication")
        return _RuleResult(None, Outcome.CONDITIONAL, gaps=[gap], trace=traces, engine=INDICATION_MISSING)
    return _RuleResult(None, Outcome.OUT_OF_SCOPE, trace=traces, indication=ctx.indication)


def _capped(result: _RuleResult) -> _RuleResult:
    """An indication read only from text, or a diagnosis that is only provisional, never gives a firm answer:
    the decision is conditional and asks first for the code or the confirmation (then for anything else the
    rules found missing)."""
    indication = result.indication
    if indication is None or result.outcome is Outcome.OUT_OF_SCOPE:
        return result
    would = f"once {{}}, the answer would be {_OUTCOME_WORDS[result.outcome]}" if result.outcome.firm else \
        "other documentation is needed too"
    if indication.via_text:
        gap = Gap(f"a coded diagnosis (ICD-10-CM) for the indication written as '{indication.concept.label()}'; "
                  + would.format("coded"), "code the indication", "indication-coding")
        engine = INDICATION_UNCODED
    elif indication.question:
        gap = Gap(f"confirmation of the diagnosis '{indication.label()}' (recorded as {indication.question}); "
                  + would.format("confirmed"), "confirm the diagnosis", "diagnosis-confirmation")
        engine = DIAGNOSIS_UNCONFIRMED
    else:
        return result
    notes = [*result.notes, f"the rules gave {result.outcome.value} (rule {result.rule.id if result.rule else '-'})"]
    gaps = [gap, *(result.gaps if result.outcome is Outcome.CONDITIONAL else [])]
    return _RuleResult(None, Outcome.CONDITIONAL, result.evidence, gaps, notes, result.trace, indication,
                       engine=engine)


def _reconcile(results: list[_RuleResult], candidates: Candidates) -> tuple[_RuleResult, list[str]]:
    """One answer from the candidates' answers, and notes on the others. The codings of one Condition that lead
    to the same answer count once; candidates whose answers are the same, or that all wait on the same
    documentation, give that answer; otherwise the indication is the question."""
    by_source: dict[tuple[str, tuple[Outcome, str]], _RuleResult] = {}
    for result in results:
        by_source.setdefault((result.indication.reference if result.indication else "", result.key), result)
    distinct = list(by_source.values())
    first, others = distinct[0], distinct[1:]
    keys = {r.key for r in distinct}
    outcomes = {r.outcome for r in distinct}
    if len(keys) == 1 or (len(outcomes) == 1 and first.outcome.firm):
        notes = ["other candidate indications lead to the same outcome: " + "; ".join(r.describe() for r in others)
                 ] if others else []
        return first, notes
    if outcomes == {Outcome.CONDITIONAL} and len({tuple(sorted(g.text for g in r.gaps)) for r in distinct}) == 1:
        return first, ["other candidate indications wait on the same documentation: "
                       + "; ".join(r.describe() for r in others)]
    sources = {r.indication.reference for r in distinct if r.indication}
    if len(sources) == 1:
        engine = INDICATION_CONFLICT
        text = (f"the indication: the codings of {sources.pop()} point to different decisions ("
                + "; ".join(r.describe() for r in distinct) + "); correct the coding or state the indication")
        label = "resolve conflicting codes"
    else:
        engine = INDICATION_AMBIGUOUS
        where = "the order's reasons support" if candidates.from_order else "the problem list supports"
        how = ("each waiting on documentation of its own" if outcomes == {Outcome.CONDITIONAL}
               else "with different decisions")
        text = (f"the indication for this order (reasonCode): {where} more than one, {how}: "
                + "; ".join(r.describe() for r in distinct))
        label = "state the indication"
    evidence = [e for r in distinct for e in r.evidence]
    return _RuleResult(None, Outcome.CONDITIONAL, evidence, [Gap(text, label, "indication")], engine=engine), []


def _wording(policy: Policy, result: _RuleResult, gaps: list[Gap]) -> tuple[str, str, str]:
    """Clause, reason and summary: the rule's, or, for the engine's own outcomes, outcomes.yaml's."""
    if result.rule is None:
        wording = policy.outcomes[result.engine or NO_RULE]
        values = {"policy": policy.id, "missing_indication": policy.missing_indication}
        return wording.clause.format(**values), wording.reason.format(**values), wording.summary.format(**values)
    rule = result.rule
    if result.outcome is Outcome.NOT_COVERED and result.failure is not None and rule.outcome is not Outcome.NOT_COVERED:
        return rule.clause, result.failure.reason, result.failure.summary
    summary = rule.summary(result.outcome)
    labels = unique([g.label for g in gaps if g.label])
    if result.outcome is Outcome.CONDITIONAL and labels:
        summary = "; ".join(labels[:2]) + (f" (+{len(labels) - 2} more)" if len(labels) > 2 else "")
    return rule.clause, rule.reason(result.outcome), summary


def _per_candidate(policy: Policy, ctx: EvaluationContext, candidates: Candidates) -> list[_RuleResult]:
    """What the rules give for each candidate indication (or, with none, for no indication)."""
    options: list[Indication | None] = list(candidates.items) or list(candidates.unplaced[:1]) or [None]
    results = [_capped(_run_rules(policy, ctx.with_indication(option))) for option in options]
    if candidates.unplaced and not candidates.items:
        labels = ", ".join(f"'{u.label()}'" for u in candidates.unplaced)
        for result in results:
            result.gaps = [Gap(g.text + f" (the order's reason {labels} is not one the policy recognises)", g.label,
                               g.kind, g.about) for g in result.gaps]
            result.indication = None
    return results


def _held(chosen: _RuleResult, engine: str, gaps: list[Gap], note: str, notes: list[str]) -> _RuleResult:
    """A decision that cannot be firm over something the rules do not see (a drug not identified, a
    contradiction in the documentation, data that could not be read): conditional, asking for ``gaps``; what
    the rules gave is noted."""
    notes.append(note)
    return _RuleResult(None, Outcome.CONDITIONAL, chosen.evidence, gaps, indication=chosen.indication, engine=engine)


def decide(policy_set: PolicySet, policy: Policy, match: TriggerMatch, order: OrderFacts,
           draft_orders: Sequence[OrderFacts], record: PatientRecord, *, today: dt.date | None = None,
           medications: Medications | None = None, conflicts: Sequence[Gap] = ()) -> Decision:
    """The policy's decision on ``order`` (which ``match`` says the policy governs), from the draft orders and
    the record: the candidate indications, the rules tried for each (:func:`_run_rules`), one answer from
    theirs (:func:`_reconcile`), held conditional over what the rules do not see (:func:`_held`), worded
    (:func:`_wording`). ``conflicts``: documentation (a DTR form's answers) that contradicts coded record data,
    found by the caller. What the decision consulted is its own (:class:`DecisionScope`)."""
    now = dt.datetime.now(dt.UTC)
    moment = dt.datetime(today.year, today.month, today.day, tzinfo=dt.UTC) if today else now
    scope = DecisionScope()
    ctx = EvaluationContext(
        systems=policy_set.systems, value_sets=policy.value_sets, order=order, draft_orders=draft_orders,
        record=record, statuses=policy_set.statuses, today=moment, medications=medications or Medications(),
        scope=scope, implied_route=match.trigger.route,
    )
    candidates = indication_candidates(policy.indication, ctx)
    notes = list(candidates.notes)
    notes.extend(f"{key} was one object where FHIR R4 has a list: read as a list of one" for key in order.lenient)
    results = _per_candidate(policy, ctx, candidates)
    chosen, more = _reconcile(results, candidates) if len(results) > 1 else (results[0], [])
    notes.extend(more)
    notes.extend(n for r in results for n in r.notes)
    decided = chosen.outcome is not Outcome.OUT_OF_SCOPE
    if match.unidentified_drug and decided:
        chosen = _held(chosen, DRUG_UNIDENTIFIED, [Gap(
            f"confirmation of the drug ordered in {order.reference} ({match.how}): the decision depends on it",
            "confirm the drug", "drug")], f"from the rest of the record the rules gave: {chosen.outcome.value}", notes)
    if conflicts and decided:  # documentation (DTR forms, dtr/extract.py) never gives a firm answer over them
        kept = chosen.gaps if chosen.outcome is Outcome.CONDITIONAL else []
        chosen = _held(chosen, DOCUMENTATION_CONFLICT, [*conflicts, *kept], "from the record and the documentation, "
                       f"the rules gave: {chosen.outcome.value} (rule {chosen.key[1]})", notes)
    technical = record.technical_gaps(scope.consulted)
    # out of scope by a rule that reads only the order (a route that is not the policy's): no data mattered
    if chosen.outcome is Outcome.OUT_OF_SCOPE and chosen.rule is not None and not chosen.rule.needs_indication:
        technical = {}
    if technical:
        chosen = _held(chosen, DATA_UNAVAILABLE, [Gap(f"{rtype} data could not be read ({why})", None, "technical")
                                                  for rtype, why in sorted(technical.items())],
                       f"from the data that could be read, the rules gave: {chosen.outcome.value} "
                       f"(rule {chosen.key[1]})", notes)
    label = match.trigger.label  # rule summaries may name the drug as {drug}
    gaps = unique([replace(g, text=g.text.replace("{drug}", label)) for g in chosen.gaps])
    clause, reason, summary = _wording(policy, chosen, gaps)
    decided_for = chosen.indication if chosen.rule is not None and chosen.rule.when else None
    return Decision(
        policy_id=policy.id,
        policy_title=policy.title,
        order_reference=order.reference,
        outcome=chosen.outcome,
        rule_id=chosen.key[1],
        clause=clause,
        reason=reason,
        summary=summary.replace("{drug}", label),
        evidence=unique([Evidence(order.reference, f"{label} order [{match.how}]"), *chosen.evidence]),
        missing=unique([g.text for g in gaps]),
        gaps=gaps,
        notes=unique([n.replace("{drug}", label) for n in notes]),
        indication=decided_for.label() if decided_for else None,
        technical=technical,
        trace=[t for r in results for t in r.trace],
        skipped_resources=[f"{s.reference}: {s.reason}" for s in record.skipped],
        text_read=list(scope.text_read),
        policy_version=policy.version,
    )
