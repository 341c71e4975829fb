"""Code systems and value sets: normalising system URIs and matching codes against compiled sets.

Value sets are compiled once, at policy load, into set lookups (and, for ICD-10-CM wildcards,
one regular expression), so that matching a coding costs a handful of dictionary probes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml


class TerminologyError(ValueError):
    """A code system or value set definition is not valid."""


@dataclass(frozen=True)
class CodeSystem:
    name: str
    canonical: str
    aliases: tuple[str, ...]
    hierarchical: bool


class Coding(NamedTuple):
    """A coding reduced to what matching needs: the system's short name (or raw URI) and the code."""

    system: str
    code: str
    display: str | None = None


class CodeSystems:
    """The registry of known code systems, read from ``code-systems.yaml``."""

    def __init__(self, systems: Iterable[CodeSystem]) -> None:
        self._by_name: dict[str, CodeSystem] = {}
        self._by_uri: dict[str, CodeSystem] = {}
        for system in systems:
            self._by_name[system.name] = system
            for uri in (system.canonical, *system.aliases):
                self._by_uri[uri.rstrip("/")] = system

    @classmethod
    def load(cls, path: Path) -> CodeSystems:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("systems"), dict):
            raise TerminologyError(f"{path}: expected a mapping 'systems'")
        systems = []
        for name, spec in data["systems"].items():
            if not isinstance(spec, dict) or "canonical" not in spec:
                raise TerminologyError(f"{path}: system {name!r} needs a 'canonical' URI")
            unknown = set(spec) - {"canonical", "aliases", "matching"}
            if unknown:
                raise TerminologyError(f"{path}: system {name!r} has unknown keys {sorted(unknown)}")
            matching = spec.get("matching", "exact")
            if matching not in ("exact", "hierarchical"):
                raise TerminologyError(f"{path}: system {name!r}: matching must be exact or hierarchical")
            systems.append(
                CodeSystem(
                    name=str(name),
                    canonical=str(spec["canonical"]),
                    aliases=tuple(str(a) for a in spec.get("aliases", [])),
                    hierarchical=matching == "hierarchical",
                )
            )
        return cls(systems)

    def names(self) -> frozenset[str]:
        return frozenset(self._by_name)

    def get(self, name: str) -> CodeSystem:
        try:
            return self._by_name[name]
        except KeyError:
            raise TerminologyError(f"unknown code system {name!r}") from None

    def short_name(self, uri: Any) -> str | None:
        """The registry name for a system URI (any alias), or None when the system is not known."""
        if not isinstance(uri, str) or not uri:
            return None
        system = self._by_uri.get(uri) or self._by_uri.get(uri.strip().rstrip("/"))
        return system.name if system else None

    def coding(self, raw: Mapping[str, Any]) -> Coding | None:
        """Reduce a FHIR Coding (as a JSON mapping) to a :class:`Coding`, or None when it has no code."""
        code = raw.get("code")
        if not isinstance(code, str) or not code.strip():
            return None
        system = raw.get("system")
        name = self.short_name(system) if isinstance(system, str) else None
        display = raw.get("display")
        return Coding(
            system=name or (system if isinstance(system, str) else ""),
            code=code.strip(),
            display=display if isinstance(display, str) else None,
        )

    def concept(self, raw: Any) -> Concept:
        """A :class:`Concept` from a CodeableConcept as JSON (anything else gives an empty concept)."""
        if not isinstance(raw, Mapping):
            return Concept(codings=())
        text = raw.get("text")
        return Concept(codings=tuple(self.codings(raw)), text=text if isinstance(text, str) else None)

    def codings(self, concept: Any) -> list[Coding]:
        """All usable codings of a CodeableConcept given as a JSON mapping (anything else yields none)."""
        if not isinstance(concept, Mapping):
            return []
        out = []
        for raw in concept.get("coding") or []:
            if isinstance(raw, Mapping):
                coding = self.coding(raw)
                if coding is not None:
                    out.append(coding)
        return out


class Concept(NamedTuple):
    """A CodeableConcept reduced to its codings and its free text."""

    codings: tuple[Coding, ...]
    text: str | None = None

    def texts(self) -> list[str | None]:
        return [self.text, *(c.display for c in self.codings)]

    def label(self) -> str:
        if self.text:
            return self.text
        for coding in self.codings:
            if coding.display:
                return coding.display
        return ", ".join(f"{c.system}|{c.code}" for c in self.codings) or "(uncoded)"

    @staticmethod
    def merge(concepts: Iterable[Concept]) -> Concept:
        items = list(concepts)
        texts = [c.text for c in items if c.text]
        return Concept(
            codings=tuple(coding for c in items for coding in c.codings),
            text="; ".join(texts) if texts else None,
        )


def normalise_icd10(code: str) -> str:
    return code.strip().upper().replace(".", "")


_ICD_RANGE = re.compile(r"^([A-Z])(\d{2})-([A-Z])(\d{2})$")


@dataclass
class _SystemMatcher:
    exact: set[str] = field(default_factory=set)
    prefixes: set[str] = field(default_factory=set)
    pattern: re.Pattern[str] | None = None

    def matches(self, code: str, hierarchical: bool) -> bool:
        if not hierarchical:
            return code in self.exact
        norm = normalise_icd10(code)
        prefixes = self.prefixes
        for end in range(3, len(norm) + 1):
            if norm[:end] in prefixes:
                return True
        return bool(self.pattern and self.pattern.fullmatch(norm))


class ValueSet:
    """A named set of codes across code systems, compiled for fast membership tests."""

    def __init__(
        self,
        name: str,
        title: str,
        systems: CodeSystems,
        codes: Mapping[str, Iterable[str]],
        text: Iterable[str] = (),
    ) -> None:
        self.name = name
        self.title = title
        self._systems = systems
        phrases = [str(t).strip() for t in text if str(t).strip()]
        self.text_phrases = tuple(phrases)
        alternatives = "|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))
        self._text = (
            re.compile(r"(?<![\w-])(?:" + alternatives + r")(?![\w-])", re.IGNORECASE)
            if phrases
            else None
        )
        self._matchers: dict[str, _SystemMatcher] = {}
        self._hierarchical: dict[str, bool] = {}
        self.listed: dict[str, tuple[str, ...]] = {}
        for system_name, entries in codes.items():
            system = systems.get(system_name)
            matcher = _SystemMatcher()
            patterns: list[str] = []
            listed = []
            for entry in entries:
                text = str(entry).strip()
                if not text:
                    raise TerminologyError(f"value set {name!r}: empty code under {system_name}")
                listed.append(text)
                if not system.hierarchical:
                    matcher.exact.add(text)
                    continue
                norm = normalise_icd10(text)
                if "-" in text:
                    range_match = _ICD_RANGE.match(norm)
                    if not range_match or range_match.group(1) != range_match.group(3):
                        raise TerminologyError(f"value set {name!r}: bad ICD-10-CM range {text!r}")
                    letter, low, high = range_match.group(1), int(range_match.group(2)), int(range_match.group(4))
                    if low > high:
                        raise TerminologyError(f"value set {name!r}: empty ICD-10-CM range {text!r}")
                    matcher.prefixes.update(f"{letter}{n:02d}" for n in range(low, high + 1))
                elif "*" in norm:
                    patterns.append(".*".join(re.escape(part) for part in norm.split("*")))
                else:
                    if len(norm) < 3:
                        raise TerminologyError(f"value set {name!r}: ICD-10-CM code {text!r} is too short")
                    matcher.prefixes.add(norm)
            if patterns:
                matcher.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))
            self._matchers[system_name] = matcher
            self._hierarchical[system_name] = system.hierarchical
            self.listed[system_name] = tuple(listed)

    def contains(self, coding: Coding) -> bool:
        return self.contains_code(coding.system, coding.code)

    def contains_code(self, system: str, code: str) -> bool:
        """Whether ``code`` of the system with short name ``system`` is in this value set."""
        matcher = self._matchers.get(system)
        if matcher is None:
            return False
        return matcher.matches(code, self._hierarchical[system])

    def contains_raw(self, systems: CodeSystems, concept: Any) -> bool:
        """Whether any coding of a CodeableConcept given as JSON is in this value set (a fast path for
        filtering raw resources: no objects are built)."""
        if not isinstance(concept, Mapping):
            return False
        for coding in concept.get("coding") or ():
            if isinstance(coding, Mapping):
                system, code = systems.short_name(coding.get("system")), coding.get("code")
                if system and isinstance(code, str) and self.contains_code(system, code.strip()):
                    return True
        return False

    def first_match(self, codings: Iterable[Coding]) -> Coding | None:
        for coding in codings:
            if self.contains(coding):
                return coding
        return None

    def match_text(self, texts: Iterable[str | None]) -> str | None:
        """The first phrase of this value set found in any of ``texts``, or None."""
        if self._text is None:
            return None
        for text in texts:
            if text:
                found = self._text.search(text)
                if found:
                    return found.group(0)
        return None

    def match(self, concept: Concept) -> str | None:
        """How ``concept`` belongs to this value set ("system|code" or 'text "phrase"'), or None."""
        coding = self.first_match(concept.codings)
        if coding is not None:
            return f"{coding.system}|{coding.code}"
        phrase = self.match_text(concept.texts())
        return f'text "{phrase}"' if phrase else None

    def system_codes(self, system_name: str) -> tuple[str, ...]:
        """The codes listed for one system, as written (used to build scoped prefetch queries)."""
        return self.listed.get(system_name, ())

    def canonical_uri(self, system_name: str) -> str:
        return self._systems.get(system_name).canonical
