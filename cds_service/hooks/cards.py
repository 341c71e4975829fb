"""CDS Hooks cards for coverage decisions, worded by the Jinja templates in ``cards/``.

One card per decided order, with one clear summary for the clinician (status, what and which policy), of
one of the CRD card types (CRD 2.0.1 "External Reference" and "Instructions" response types; the coverage
information itself is a systemAction, not a card):

- an **Instructions** card whenever something must be done or documented: the order is conditional on
  information the record lacks (what to document, item by item), or on data that could not be read (what,
  and to ask again), or no Coverage of the patient was found (record it). Then why, the evidence, and the
  policy named in the text (an Instructions card carries no ``links``);
- otherwise an **External Reference** card: why, the evidence used, and a link to the policy.

One card per order keeps the EHR's view readable (the CDS Hooks sandbox shows cards one under another).

Text that comes from the EHR or the record is made inert markdown (no links, images, HTML, emphasis,
and no autolinks: bare URLs, ``www.`` names and e-mail addresses stay text) and is clipped, so a card
stays small whatever the request holds.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from ..engine.decision import Decision, Outcome

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


class CardRenderer:
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

    def summary(self, decision: Decision) -> str:
        return _one_line(self.summary_template.render(d=decision, status=decision.outcome.value))

    @staticmethod
    def needs_instructions(decision: Decision, coverage_known: bool) -> bool:
        """Something must be done or documented: the decision is conditional on something missing
        (information to document, or data that could not be read), or the patient's Coverage is unknown."""
        return (decision.outcome is Outcome.CONDITIONAL and bool(decision.missing)) or not coverage_known

    def cards(self, decision: Decision, *, trigger_label: str, order_label: str, payer_name: str,
              policy_url: str, advisory_only: bool, topic: Mapping[str, str], coverage_known: bool = True,
              notes: list[str] | None = None) -> list[dict[str, Any]]:
        """The card for one decision: an Instructions card when something must be done or documented, else an
        External Reference card. ``coverage_known`` is false when no Coverage of the patient was found."""
        instructions = self.needs_instructions(decision, coverage_known)
        evidence = decision.evidence[:MAX_EVIDENCE]
        values = {
            "d": decision,
            "status": decision.outcome.value,
            "status_label": _STATUS_LABELS.get(decision.outcome, decision.outcome.value),
            "trigger_label": trigger_label,
            "order_label": order_label,
            "advisory_only": advisory_only,
            "payer_name": payer_name,
            "evidence": evidence,
            "more_evidence": len(decision.evidence) - len(evidence),
            "notes": decision.notes if notes is None else notes,
            "instructions": instructions,
            "coverage_known": coverage_known,
            "policy_url": policy_url,
        }
        card: dict[str, Any] = {
            "uuid": str(uuid.uuid4()),
            "summary": self.summary(decision),
            "detail": "",
            "indicator": "warning" if decision.outcome is Outcome.NOT_COVERED else "info",
            "source": {"label": payer_name, "topic": dict(topic)},
        }
        if instructions:
            todo = self.instructions_template.render(**values)
            card["detail"] = self._markdown(todo + "\n\n" + self.detail_template.render(**values))
        else:
            card["detail"] = self._markdown(self.detail_template.render(**values))
            card["links"] = [{"label": f"{decision.policy_id}: {decision.policy_title}", "url": policy_url,
                              "type": "absolute"}]
        card["extension"] = {"davinci-crd.associated-resource": [{"reference": decision.order_reference}]}
        return [card]

    @staticmethod
    def _markdown(text: str) -> str:
        text = re.sub(r"\n{3,}", "\n\n", text).strip()
        if len(text) > MAX_DETAIL:
            cut = text.rfind("\n", 0, MAX_DETAIL - 80)
            text = text[: cut if cut > 0 else MAX_DETAIL - 80].rstrip() + "\n\n" + _SHORTENED
        return text
