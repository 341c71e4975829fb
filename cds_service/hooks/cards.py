"""CDS Hooks cards for coverage decisions, worded by the Jinja templates in ``cards/``.

Per decided order, one clear summary for the clinician (status, what and which policy), on a card of one of
the CRD card types (CRD 2.0.1 "External Reference" and "Instructions" response types; the coverage information
itself is a systemAction, not a card):

- when the decision waits on documentation (conditional on clinical information the record lacks), one
  **Instructions** card: what to document, item by item, then why, the evidence, and the policy named in its
  text (an Instructions card carries no ``links``). One card keeps the EHR's view readable (the CDS Hooks
  sandbox shows one card per order there);
- otherwise an **External Reference** card (why, the evidence used, the policy link), followed by an
  **Instructions** card, without links, when something else must be done: data that could not be read (what,
  and to ask again), or no Coverage of the patient was found (record it).

Text that comes from the EHR or the record is made inert markdown (no links, images, HTML, emphasis,
and no autolinks: bare URLs, ``www.`` names and e-mail addresses stay text) and is clipped, so a card
stays small whatever the request holds.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2

from ..engine.decision import Decision, Evidence, Outcome

MAX_SUMMARY = 139
#: at most this many evidence lines per card (the decision trace in the audit keeps them all)
MAX_EVIDENCE = 20
#: text from the EHR shown in a card is clipped to this many characters per item
MAX_TEXT = 500
#: a card's detail is cut (at a line) to this many characters
MAX_DETAIL = 8000

#: backslash-escaped in EHR text: markdown syntax, and ``. : @`` so that no renderer (GFM autolink
#: literals, markdown-it linkify with fuzzy links) turns a URL, a domain name or an address into a link
_MD_ESCAPES = str.maketrans({**{c: "\\" + c for c in "\\`*_{}[]()#+!|<>~.:@"}, "\n": " ", "\r": " "})
_SHORTENED = "(shortened: the decision trace has it all)"
_STATUS_LABELS = {
    Outcome.COVERED: "covered",
    Outcome.NOT_COVERED: "not covered",
    Outcome.CONDITIONAL: "coverage is conditional",
}


def clip(value: Any, limit: int = MAX_TEXT) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def escape_markdown(value: Any) -> str:
    """Text from the EHR or the record, made inert in markdown (no links, autolinks, images, HTML or
    emphasis) and clipped to :data:`MAX_TEXT` characters."""
    return clip(value).translate(_MD_ESCAPES)


def escape_code(value: Any) -> str:
    return clip(value).replace("`", "'").replace("\n", " ")


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > MAX_SUMMARY:
        text = text[: MAX_SUMMARY - 1].rstrip() + "…"
    return text



def _words(text: str) -> set[str]:
    return set(re.findall(r"[\w|.\-]+", text.lower()))


def by_resource(evidence: Sequence[Evidence]) -> list[Evidence]:
    """One evidence line per resource, in order of first mention: its findings joined, leaving out a finding
    whose every word another finding on the same resource already says (two criteria often read one
    resource: the pump drug's approval and its route). The decision trace keeps every finding."""
    findings: dict[str, list[str]] = {}
    for item in evidence:
        findings.setdefault(item.reference, []).append(item.finding)
    merged = []
    for reference, texts in findings.items():
        words = [_words(t) for t in texts]
        kept = [t for i, t in enumerate(texts)
                if not any(j != i and words[i] <= words[j] and (words[i] != words[j] or j < i)
                           for j in range(len(texts)))]
        merged.append(Evidence(reference, "; ".join(kept)))
    return merged

class CardRenderer:
    """The card templates of one directory (``cards/``), compiled once; :meth:`cards` words a decision's cards."""

    def __init__(self, template_dir: Path) -> None:
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(template_dir)),
            undefined=jinja2.StrictUndefined,
            autoescape=False,  # markdown, escaped field by field with |md
            keep_trailing_newline=False,
        )
        self.env.filters["md"] = escape_markdown
        self.env.filters["code"] = escape_code
        self.summary_template = self.env.get_template("summary.txt.j2")
        self.detail_template = self.env.get_template("detail.md.j2")
        self.instructions_template = self.env.get_template("instructions.md.j2")
        self.instructions_summary_template = self.env.get_template("instructions-summary.txt.j2")

    def summary(self, decision: Decision) -> str:
        return _one_line(self.summary_template.render(d=decision, status=decision.outcome.value))

    @staticmethod
    def documentation_needed(decision: Decision) -> bool:
        """The decision waits on clinical information to document (not on data that could not be read)."""
        return decision.outcome is Outcome.CONDITIONAL and bool(decision.missing) and not decision.technical

    def cards(self, decision: Decision, *, trigger_label: str, order_label: str, payer_name: str,
              policy_url: str, advisory_only: bool, topic: Mapping[str, str], coverage_known: bool = True,
              notes: list[str] | None = None, documentation_form: str | None = None) -> list[dict[str, Any]]:
        """The cards for one decision (see the module's description). ``coverage_known`` is false when no
        Coverage of the patient was found; ``documentation_form``: one line on the DTR form that asks for
        what is missing."""
        documentation = self.documentation_needed(decision)
        grouped = by_resource(decision.evidence)
        evidence = grouped[:MAX_EVIDENCE]
        values = {
            "d": decision,
            "status": decision.outcome.value,
            "status_label": _STATUS_LABELS.get(decision.outcome, decision.outcome.value),
            "trigger_label": trigger_label,
            "order_label": order_label,
            "advisory_only": advisory_only,
            "payer_name": payer_name,
            "evidence": evidence,
            "more_evidence": len(grouped) - len(evidence),
            "notes": decision.notes if notes is None else notes,
            "instructions": documentation,
            "coverage_known": coverage_known,
            "policy_url": policy_url,
            "documentation_form": documentation_form,
        }
        source = {"label": payer_name, "topic": dict(topic)}
        associated = {"davinci-crd.associated-resource": [{"reference": decision.order_reference}]}
        main: dict[str, Any] = {
            "uuid": str(uuid.uuid4()),
            "summary": self.summary(decision),
            "detail": self.detail_template.render(**values),
            "indicator": "warning" if decision.outcome is Outcome.NOT_COVERED else "info",
            "source": source,
        }
        if documentation:  # one Instructions card: what to document first, then the rest
            main["detail"] = self._markdown(self.instructions_template.render(**values) + "\n\n" + main["detail"])
            main["extension"] = associated
            return [main]
        main["detail"] = self._markdown(main["detail"])
        main["links"] = [{"label": f"{decision.policy_id}: {decision.policy_title}", "url": policy_url,
                          "type": "absolute"}]
        main["extension"] = associated
        out = [main]
        if decision.technical or not coverage_known:
            out.append({
                "uuid": str(uuid.uuid4()),
                "summary": _one_line(self.instructions_summary_template.render(**values)),
                "detail": self._markdown(self.instructions_template.render(**values)),
                "indicator": "info",
                "source": source,
                "extension": associated,
            })
        return out

    @staticmethod
    def _markdown(text: str) -> str:
        text = re.sub(r"\n{3,}", "\n\n", text).strip()
        if len(text) > MAX_DETAIL:
            cut = text.rfind("\n", 0, MAX_DETAIL - 80)
            text = text[: cut if cut > 0 else MAX_DETAIL - 80].rstrip() + "\n\n" + _SHORTENED
        return text
