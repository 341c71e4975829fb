"""The CRD side of the forms: which form (and which of its sections) a conditional decision points to, the
line its card says about it, and the context kept for the ``$questionnaire-package`` request that follows
(found by the coverage-assertion-id)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.decision import Decision, Outcome
from ..engine.policy import PolicySet
from ..fhir.record import PatientRecord
from .forms import Form, FormSet, Section, load_forms, rules_of
from .prefill import chart
from .questionnaire import canonical

FORMS_DIR = "forms"


@dataclass(frozen=True)
class FormLink:
    """The form a decision points to and the sections it needs."""

    form: Form
    canonical: str
    sections: tuple[Section, ...]

    @property
    def line(self) -> str:
        """One line for the card: what the form asks."""
        asks = "; ".join(s.text.lower() for s in self.sections)
        return f"Documentation form \"{self.form.title}\" (DTR) asks for: {asks}."


class DocumentationForms:
    """The forms of a policy set, and what a decision needs of them."""

    def __init__(self, policies: PolicySet, forms: FormSet) -> None:
        self.policies = policies
        self.forms = forms

    @classmethod
    def load(cls, policies: PolicySet) -> DocumentationForms:
        return cls(policies, load_forms(Path(policies.directory) / FORMS_DIR, policies))

    def link(self, decision: Decision, base_url: str, advisory_only: bool = False) -> FormLink | None:
        """The form for a decision that waits on documentation a form can collect (conditional on clinical
        information, not on data that could not be read; never on order-select, which is advisory)."""
        if decision.outcome is not Outcome.CONDITIONAL or decision.technical or advisory_only or not decision.gaps:
            return None
        form = self.forms.for_policy(decision.policy_id)
        if form is None:
            return None
        sections = form.sections_for(decision.gaps, rules_of(decision))
        if not sections:
            return None
        return FormLink(form, canonical(base_url, form), tuple(sections))

    def context(self, decision: Decision, link: FormLink, record: PatientRecord,
                coverage: Mapping[str, Any]) -> dict[str, Any]:
        """What the package request needs: the form, the sections, what was missing and the searches the
        form's pre-fill expressions read, answered from the record (the answers are computed from them when
        the package is asked for: :meth:`Packager.draft`)."""
        items = [item for section in link.sections for item in section.items]
        return {
            "policy": decision.policy_id,
            "form": link.form.id,
            "version": link.form.version,
            "order": decision.order_reference,
            "coverage": dict(coverage),
            "rule": decision.rule_id,
            "sections": [s.id for s in link.sections],
            "gaps": [{"kind": g.kind, **({"about": g.about} if g.about else {}), "text": g.text}
                     for g in decision.gaps],
            "chart": chart(link.form, items, record),
        }
