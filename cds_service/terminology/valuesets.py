"""Value sets: named sets of codes across code systems, compiled for fast membership tests, with the
source of every code, and the phrases that stand for them in free text.

A value set is built from blocks: each block names its source (an expansion file, or the document a
hand-curated list was taken from) and lists codes per system; ``exclude`` blocks take codes out again.
ICD-10-CM entries are hierarchical (``G89.2`` matches G89.29), may be ranges (``C00-C96``) or wildcards
(``S06.*S``); other systems match exactly. Matching a coding costs a few dictionary probes and is bounded
by the length of a real code whatever a client sends.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .systems import CodeSystems, Coding, Concept, TerminologyError
from .text import PhraseMatcher, TextRules

#: The longest ICD-10-CM code is 7 characters (without its dot); anything longer is not a code.
ICD10_MAX = 7
_ICD_RANGE = re.compile(r"^([A-Z])(\d{2})-([A-Z])(\d{2})$")
TEXT_MATCH = ("when-uncoded", "always")


def normalise_icd10(code: str) -> str:
    return code.strip().upper().replace(".", "")


@dataclass(frozen=True)
class CodeBlock:
    """Codes by system short name, and where they come from."""

    source: str
    codes: Mapping[str, Sequence[str]]


@dataclass(frozen=True)
class Match:
    """How a concept belongs to a value set: by a coding, or by a phrase found in its text."""

    how: str
    coding: Coding | None = None
    phrase: str | None = None

    @property
    def via_text(self) -> bool:
        return self.coding is None


@dataclass
class _SystemMatcher:
    hierarchical: bool
    exact: set[str] = field(default_factory=set)
    prefixes: set[str] = field(default_factory=set)
    patterns: list[str] = field(default_factory=list)
    pattern: re.Pattern[str] | None = None

    def add(self, entry: str, where: str) -> None:
        if not self.hierarchical:
            self.exact.add(entry)
            return
        norm = normalise_icd10(entry)
        if "-" in norm:
            found = _ICD_RANGE.match(norm)
            if not found or found.group(1) != found.group(3):
                raise TerminologyError(f"{where}: bad ICD-10-CM range {entry!r}")
            letter, low, high = found.group(1), int(found.group(2)), int(found.group(4))
            if low > high:
                raise TerminologyError(f"{where}: empty ICD-10-CM range {entry!r}")
            self.prefixes.update(f"{letter}{n:02d}" for n in range(low, high + 1))
        elif "*" in norm:
            self.patterns.append(".*".join(re.escape(part) for part in norm.split("*")))
        else:
            if not 3 <= len(norm) <= ICD10_MAX:
                raise TerminologyError(f"{where}: {entry!r} is not an ICD-10-CM code")
            self.prefixes.add(norm)

    def compile(self) -> None:
        if self.patterns:
            self.pattern = re.compile("|".join(f"(?:{p})" for p in self.patterns))

    def matches(self, code: str) -> bool:
        if not self.hierarchical:
            return code in self.exact
        norm = normalise_icd10(code)
        if len(norm) > ICD10_MAX:
            return False
        prefixes = self.prefixes
        if prefixes and any(norm[:end] in prefixes for end in range(3, len(norm) + 1)):
            return True
        return bool(self.pattern and self.pattern.fullmatch(norm))


class ValueSet:
    """A named set of codes across code systems (with their sources) and of phrases."""

    def __init__(
        self,
        name: str,
        title: str,
        systems: CodeSystems,
        includes: Sequence[CodeBlock],
        excludes: Sequence[CodeBlock] = (),
        text: Iterable[str] = (),
        text_rules: TextRules | None = None,
        text_match: str = "when-uncoded",
        note: str | None = None,
    ) -> None:
        if text_match not in TEXT_MATCH:
            raise TerminologyError(f"value set {name!r}: text_match must be one of {list(TEXT_MATCH)}")
        self.name = name
        self.title = title
        self.note = note
        self.text_match = text_match
        self._systems = systems
        self._known = systems.names()
        self.text = PhraseMatcher(text, text_rules or TextRules.none())
        self._include: dict[str, _SystemMatcher] = {}
        self._exclude: dict[str, _SystemMatcher] = {}
        #: (system, entry) -> the sources it was taken from
        self.provenance: dict[tuple[str, str], list[str]] = {}
        where = f"value set {name!r}"
        for blocks, matchers, record in ((includes, self._include, True), (excludes, self._exclude, False)):
            for block in blocks:
                if not block.source.strip():
                    raise TerminologyError(f"{where}: every block of codes needs a source")
                for system_name, entries in block.codes.items():
                    system = systems.get(system_name)
                    matcher = matchers.setdefault(system_name, _SystemMatcher(system.hierarchical))
                    for entry in entries:
                        text = str(entry).strip()
                        if not text:
                            raise TerminologyError(f"{where}: empty code under {system_name}")
                        matcher.add(text, where)
                        if record:
                            self.provenance.setdefault((system_name, text), []).append(block.source)
        for matcher in (*self._include.values(), *self._exclude.values()):
            matcher.compile()
        if not self.provenance and not self.text:
            raise TerminologyError(f"{where}: has no codes and no text")
        listed: dict[str, list[str]] = {}
        for (system_name, entry) in self.provenance:
            exclude = self._exclude.get(system_name)
            if exclude is None or not exclude.matches(entry):
                listed.setdefault(system_name, []).append(entry)
        self.listed: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in listed.items()}

    def __repr__(self) -> str:
        return f"ValueSet({self.name!r})"

    # --- membership ------------------------------------------------------------------------

    def systems(self) -> frozenset[str]:
        """The code systems this value set lists codes in (by their short names)."""
        return frozenset(self._include)

    def contains(self, coding: Coding) -> bool:
        return self.contains_code(coding.system, coding.code)

    def contains_code(self, system: str, code: str) -> bool:
        """Whether ``code`` of the system with short name ``system`` is in this value set."""
        matcher = self._include.get(system)
        if matcher is None or not matcher.matches(code):
            return False
        exclude = self._exclude.get(system)
        return exclude is None or not exclude.matches(code)

    def contains_raw(self, systems: CodeSystems, concept: object) -> bool:
        """Whether any coding of a CodeableConcept given as JSON is in this value set (a fast path for
        filtering raw resources: no objects are built)."""
        return any(self.contains(c) for c in systems.codings(concept))

    def first_match(self, codings: Iterable[Coding]) -> Coding | None:
        for coding in codings:
            if self.contains(coding):
                return coding
        return None

    def find(self, concept: Concept) -> Match | None:
        """How ``concept`` belongs to this value set: by a coding, or else by a phrase in its text or
        displays. Text is read only when the concept has no coding in a known code system ("a coded value
        beats text"), unless the value set says ``text_match: always`` (drug names in product displays)."""
        coding = self.first_match(concept.codings)
        if coding is not None:
            return Match(f"{coding.system}|{coding.code}", coding)
        if not self.text:
            return None
        if self.text_match == "when-uncoded" and any(c.system in self._known for c in concept.codings):
            return None
        phrase = self.text.find_any(concept.texts())
        return Match(f'text "{phrase}"', phrase=phrase) if phrase else None

    def match(self, concept: Concept) -> str | None:
        """How ``concept`` belongs to this value set ("system|code" or 'text "phrase"'), or None."""
        found = self.find(concept)
        return found.how if found else None

    def canonical_uri(self, system_name: str) -> str:
        return self._systems.get(system_name).canonical
