"""Reading free text for codes' meanings: whole-word phrase matching that respects negation.

A phrase counts only as a whole word or words ("ketamine" does not match "esketamine"), case-insensitively,
and only when no negation cue governs it: a cue before it in the same clause, within a few words ("no",
"denies", "without", ...), or a cue after it ("ruled out", ...). The cues, the clause breaks and the window are
data (``policies/text-matching.yaml``), so that a policy analyst can read and extend them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .systems import TerminologyError

#: Free text longer than this is read only up to here: decisions never depend on essays, and matching stays
#: bounded whatever a client sends.
MAX_TEXT = 4000


def _alternation(phrases: Iterable[str]) -> str:
    return "|".join(re.escape(p) for p in sorted({p.strip() for p in phrases if p.strip()}, key=len, reverse=True))


def _word_pattern(phrases: Iterable[str]) -> re.Pattern[str] | None:
    alternatives = _alternation(phrases)
    if not alternatives:
        return None
    return re.compile(r"(?<![\w-])(?:" + alternatives + r")(?![\w-])", re.IGNORECASE)


@dataclass(frozen=True)
class TextRules:
    """Negation cues and clause breaks for free-text matching."""

    before: re.Pattern[str] | None
    after: re.Pattern[str] | None
    clause_break: re.Pattern[str] | None
    window_words: int

    @classmethod
    def none(cls) -> TextRules:
        """No negation handling (plain whole-word matching)."""
        return cls(None, None, None, 0)

    @classmethod
    def from_data(cls, data: Any, where: str) -> TextRules:
        if not isinstance(data, Mapping) or not isinstance(data.get("negation"), Mapping):
            raise TerminologyError(f"{where}: expected a mapping 'negation'")
        negation = data["negation"]
        unknown = set(negation) - {"before", "after", "clause_breaks", "window_words"}
        if unknown:
            raise TerminologyError(f"{where}: negation has unknown key(s) {sorted(unknown)}")
        lists = {}
        for key in ("before", "after", "clause_breaks"):
            value = negation.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
                raise TerminologyError(f"{where}: negation.{key} must be a list of phrases")
            lists[key] = value
        window = negation.get("window_words", 5)
        if not isinstance(window, int) or isinstance(window, bool) or not 0 < window <= 20:
            raise TerminologyError(f"{where}: negation.window_words must be a whole number from 1 to 20")
        breaks = _alternation(lists["clause_breaks"])
        return cls(
            before=_word_pattern(lists["before"]),
            after=_word_pattern(lists["after"]),
            clause_break=re.compile(breaks, re.IGNORECASE) if breaks else None,
            window_words=window,
        )

    @classmethod
    def load(cls, path: Path) -> TextRules:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as error:
            raise TerminologyError(f"{path.name}: cannot be read: {error}") from None
        return cls.from_data(data, path.name)

    def negated(self, text: str, start: int, end: int) -> bool:
        """Whether the phrase found at ``text[start:end]`` is negated in its clause."""
        before = text[:start]
        if self.clause_break is not None:
            breaks = list(self.clause_break.finditer(before))
            if breaks:
                before = before[breaks[-1].end():]
        if self.before is not None:
            words = before.split()
            window = " ".join(words[-self.window_words:]) if words else ""
            if window and self.before.search(window):
                return True
        if self.after is not None:
            after = text[end:]
            if self.clause_break is not None:
                cut_after = self.clause_break.search(after)
                if cut_after is not None:
                    after = after[:cut_after.start()]
            words = after.split()
            window = " ".join(words[: self.window_words])
            if window and self.after.search(window):
                return True
        return False


class PhraseMatcher:
    """A set of phrases, found as whole words and not under negation."""

    def __init__(self, phrases: Iterable[str], rules: TextRules) -> None:
        self.phrases = tuple(sorted({p.strip() for p in phrases if str(p).strip()}))
        self._pattern = _word_pattern(self.phrases)
        self._rules = rules

    def __bool__(self) -> bool:
        return self._pattern is not None

    def find(self, text: str | None) -> str | None:
        """The first phrase found in ``text`` that no negation cue governs, as written in the text."""
        if self._pattern is None or not text:
            return None
        text = text[:MAX_TEXT]
        for found in self._pattern.finditer(text):
            if not self._rules.negated(text, found.start(), found.end()):
                return found.group(0)
        return None

    def find_any(self, texts: Iterable[str | None]) -> str | None:
        for text in texts:
            found = self.find(text)
            if found is not None:
                return found
        return None
