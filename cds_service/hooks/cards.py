"""CDS Hooks cards for coverage decisions, worded by the Jinja templates in ``cards/``."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import jinja2

from ..engine.decision import Decision, Outcome

CARD_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/cdshooks-card-type"
MAX_SUMMARY = 139

_MD_ESCAPES = str.maketrans({**{c: "\\" + c for c in "\\`*_{}[]()#+!|<>~"}, "\n": " "})
_STATUS_LABELS = {
    Outcome.COVERED: "covered",
    Outcome.NOT_COVERED: "not covered",
    Outcome.CONDITIONAL: "coverage is conditional",
}


def escape_markdown(value: Any) -> str:
    """Text from the EHR or the record, made inert in markdown (no links, images, HTML or emphasis)."""
    return str(value).translate(_MD_ESCAPES)


def escape_code(value: Any) -> str:
    return str(value).replace("`", "'").replace("\n", " ")


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

    def summary(self, decision: Decision) -> str:
        text = " ".join(self.summary_template.render(d=decision, status=decision.outcome.value).split())
        if len(text) > MAX_SUMMARY:
            text = text[: MAX_SUMMARY - 1].rstrip() + "…"
        return text

    def card(self, decision: Decision, *, order_label: str, payer_name: str, policy_url: str,
             advisory_only: bool) -> dict[str, Any]:
        detail = self.detail_template.render(
            d=decision,
            status=decision.outcome.value,
            status_label=_STATUS_LABELS.get(decision.outcome, decision.outcome.value),
            order_label=order_label,
            advisory_only=advisory_only,
            policy_url=policy_url,
            payer_name=payer_name,
        )
        detail = re.sub(r"\n{3,}", "\n\n", detail).strip()
        return {
            "uuid": str(uuid.uuid4()),
            "summary": self.summary(decision),
            "detail": detail,
            "indicator": "warning" if decision.outcome is Outcome.NOT_COVERED else "info",
            "source": {
                "label": payer_name,
                "topic": {"system": CARD_TYPE_SYSTEM, "code": "coverage-info", "display": "Coverage Information"},
            },
            "links": [{"label": f"{decision.policy_id}: {decision.policy_title}", "url": policy_url,
                       "type": "absolute"}],
            "extension": {"davinci-crd.associated-resource": [{"reference": decision.order_reference}]},
        }
