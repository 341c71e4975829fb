"""The policy text the cards link to, as a clean HTML page.

The text files in ``policies/text/`` were scraped from the payer's site: they start with the site's
navigation ("Category Filter", a list of categories, "Asset Publisher"). The page starts at the policy's
title; everything before it is left out. The rest keeps its structure: section headings (upper-case
lines), bullet and numbered lists, the two-column coding tables (cells ending in ``|``) and paragraphs.
Every piece of text is HTML-escaped; the page loads nothing (no scripts, no external resources).
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from pathlib import Path

#: the page may use its own inline style and nothing else
CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

_HEADING = re.compile(r"^[A-Z][A-Z0-9 ,/&()'\u2019-]{2,}:?$")
_NUMBERED = re.compile(r"^\d{1,2}\.\s+")
_META = ("Policy Number:", "Latest Review Date:", "Category:")
_STYLE = """
body { font: 16px/1.5 system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; margin-bottom: .25rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
h3 { font-size: 1rem; } .meta { margin: 0; color: #555; } table { border-collapse: collapse; }
td { border: 1px solid #ccc; padding: .25rem .5rem; vertical-align: top; }
"""


def policy_body_lines(text: str, title: str) -> list[str]:
    """The policy's lines from its title on (the scraped site navigation before it left out)."""
    lines = [line.strip() for line in text.splitlines()]
    wanted = title.strip().casefold()
    start = next((i for i, line in enumerate(lines) if line.casefold() == wanted), None)
    if start is None:
        number = next((i for i, line in enumerate(lines) if line.startswith(_META[0])), None)
        start = number if number is not None else 0
    else:
        start += 1
    return [line for line in lines[start:] if line]


def _subheading(line: str, following: str) -> bool:
    """A short title line: ends with a colon, or has no punctuation, digits or commas and introduces a
    paragraph ("Lidocaine", "Summary of Evidence")."""
    if len(line) >= 60:
        return False
    if line.endswith(":"):
        return True
    return line[:1].isupper() and not re.search(r"[.,;:|)\d]", line) and len(following) >= 60


def _blocks(lines: list[str]) -> Iterator[str]:
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(_META):
            yield f'<p class="meta">{html.escape(line)}</p>'
            i += 1
        elif _HEADING.match(line):
            yield f"<h2>{html.escape(line.rstrip(':'))}</h2>"
            i += 1
        elif line.endswith("|"):
            cells = []
            while i < len(lines) and lines[i].endswith("|"):
                cells.append(html.escape(lines[i].rstrip("|").strip()))
                i += 1
            rows = [cells[j:j + 2] for j in range(0, len(cells), 2)]
            yield "<table>" + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows) \
                + "</table>"
        elif line.startswith("- ") or _NUMBERED.match(line):
            numbered = not line.startswith("- ")
            items = []
            while i < len(lines) and (lines[i].startswith("- ") if not numbered else _NUMBERED.match(lines[i])):
                item = lines[i][2:] if not numbered else _NUMBERED.sub("", lines[i], count=1)
                items.append(f"<li>{html.escape(item)}</li>")
                i += 1
            tag = "ol" if numbered else "ul"
            yield f"<{tag}>{''.join(items)}</{tag}>"
        elif _subheading(line, lines[i + 1] if i + 1 < len(lines) else ""):
            yield f"<h3>{html.escape(line.rstrip(':'))}</h3>"
            i += 1
        else:
            yield f"<p>{html.escape(line)}</p>"
            i += 1


def policy_page(policy_id: str, title: str, text_path: Path) -> str:
    """The HTML page of one policy."""
    lines = policy_body_lines(text_path.read_text(encoding="utf-8"), title)
    body = "\n".join(_blocks(lines))
    heading = html.escape(f"{policy_id}: {title}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{heading}</title><style>{_STYLE}</style></head>\n"
            f"<body><main><h1>{html.escape(title)}</h1>\n{body}\n</main></body></html>\n")
