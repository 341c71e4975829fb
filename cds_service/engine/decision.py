"""What a decision is: its outcome, the policy clause behind it, the evidence used and what is missing."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Status(enum.Enum):
    """The result of one criterion: met, not met, or unknown because evidence is missing."""

    MET = "met"
    NOT_MET = "not-met"
    UNKNOWN = "unknown"


class Outcome(enum.StrEnum):
    """A decision's outcome: covered and not-covered are firm; conditional waits on something (documentation,
    data that could not be read); out-of-scope means the policy gives no decision (no card)."""

    COVERED = "covered"
    NOT_COVERED = "not-covered"
    CONDITIONAL = "conditional"
    OUT_OF_SCOPE = "out-of-scope"

    @property
    def firm(self) -> bool:
        return self in (Outcome.COVERED, Outcome.NOT_COVERED)


@dataclass(frozen=True)
class Evidence:
    """A resource (or part of the order) that supported a finding, with what it showed."""

    reference: str
    finding: str


@dataclass(frozen=True)
class Gap:
    """Something a decision depends on that the record does not show: the full text for the clinician, a
    short label for one-line summaries, and what kind of fact it is (``kind``, one of ``GAP_KINDS``; ``about``
    names the value sets it concerns), so that a documentation form can ask for exactly it."""

    text: str
    label: str | None = None
    kind: str = "other"
    about: str | None = None


#: the kinds of missing facts the engine reports (a documentation form maps each to its items)
GAP_KINDS = frozenset({
    "indication", "indication-coding", "diagnosis-confirmation", "diagnosis", "route", "drug", "pump-drug",
    "trial", "pain-duration", "pain-severity", "drug-failure", "technical", "other",
})


@dataclass(frozen=True)
class Failure:
    """Why a criterion is not met, worded for the card (a one-line summary and a sentence)."""

    summary: str
    reason: str


@dataclass
class Result:
    """A criterion's answer, with the evidence behind it, what is missing (when unknown) and why it is not
    met (when the criterion can say)."""

    status: Status
    evidence: list[Evidence] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failure: Failure | None = None

    @property
    def missing(self) -> list[str]:
        return [g.text for g in self.gaps]

    @staticmethod
    def met(*evidence: Evidence, notes: list[str] | None = None) -> Result:
        return Result(Status.MET, list(evidence), notes=notes or [])

    @staticmethod
    def not_met(*evidence: Evidence, notes: list[str] | None = None, failure: Failure | None = None) -> Result:
        return Result(Status.NOT_MET, list(evidence), notes=notes or [], failure=failure)

    @staticmethod
    def unknown(missing: str | Gap, *evidence: Evidence, notes: list[str] | None = None) -> Result:
        gap = missing if isinstance(missing, Gap) else Gap(missing)
        return Result(Status.UNKNOWN, list(evidence), [gap], notes or [])


@dataclass(frozen=True)
class CriterionTrace:
    """One criterion of a rule as tried: its kind, its status, in ``when`` or ``require``, and its notes."""

    kind: str
    status: Status
    phase: str  # "when" or "require"
    notes: tuple[str, ...] = ()


@dataclass
class RuleTrace:
    """One rule as tried (for one candidate indication): whether its ``when`` held, and each criterion."""

    rule_id: str
    applied: bool
    criteria: list[CriterionTrace] = field(default_factory=list)
    indication: str | None = None


def unique(items: list[Any]) -> list[Any]:
    """``items`` without repeats, in their first order."""
    return list(dict.fromkeys(items))


@dataclass
class Decision:
    """A policy's decision on one draft order, traceable to a clause and to the resources used."""

    policy_id: str
    policy_title: str
    order_reference: str
    outcome: Outcome
    rule_id: str
    clause: str
    reason: str
    summary: str
    evidence: list[Evidence] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    #: what is missing, structured (``missing`` holds their texts)
    gaps: list[Gap] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    indication: str | None = None
    technical: dict[str, str] = field(default_factory=dict)
    trace: list[RuleTrace] = field(default_factory=list)
    skipped_resources: list[str] = field(default_factory=list)
    #: facts read from free text rather than codes (said in the trace and on the card)
    text_read: list[str] = field(default_factory=list)
    #: the version of the policy the decision was made under (``Policy.version``)
    policy_version: str = ""

    @property
    def decided(self) -> bool:
        return self.outcome is not Outcome.OUT_OF_SCOPE

    def explain_text(self) -> str:
        """The decision trace for a person (``cds-service evaluate --explain``)."""
        lines = [f"{self.order_reference}: {self.policy_id} -> {self.outcome.value} (rule {self.rule_id})",
                 f"  policy version: {self.policy_version}", f"  clause: {self.clause}", f"  reason: {self.reason}"]
        if self.indication:
            lines.append(f"  indication: {self.indication}")
        lines.extend(f"  evidence: {e.reference}: {e.finding}" for e in self.evidence)
        lines.extend(f"  missing: {m}" for m in self.missing)
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.extend(f"  skipped resource: {s}" for s in self.skipped_resources)
        tried = ", ".join(f"{t.rule_id}{'*' if t.applied else ''}" for t in self.trace)
        lines.append(f"  rules tried (* applied): {tried}")
        return "\n".join(lines)

    def explain(self) -> dict[str, Any]:
        """The decision trace as plain data: which policy, which clause, which resources, what was missing."""
        return {
            "policy": self.policy_id,
            "policy_version": self.policy_version,
            "order": self.order_reference,
            "outcome": self.outcome.value,
            "rule": self.rule_id,
            "clause": self.clause,
            "reason": self.reason,
            "indication": self.indication,
            "evidence": [{"reference": e.reference, "finding": e.finding} for e in self.evidence],
            "missing": list(self.missing),
            "gaps": [{"kind": g.kind, **({"about": g.about} if g.about else {}), "text": g.text} for g in self.gaps],
            "notes": list(self.notes),
            "text_read": list(self.text_read),
            "technical": dict(self.technical),
            "skipped_resources": list(self.skipped_resources),
            "rules_tried": [
                {
                    "rule": t.rule_id,
                    "applied": t.applied,
                    **({"indication": t.indication} if t.indication else {}),
                    "criteria": [
                        {"kind": c.kind, "phase": c.phase, "status": c.status.value,
                         **({"notes": list(c.notes)} if c.notes else {})}
                        for c in t.criteria
                    ],
                }
                for t in self.trace
            ],
        }
