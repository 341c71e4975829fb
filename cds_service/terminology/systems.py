"""Code systems: normalising system URIs, and FHIR codings and CodeableConcepts reduced to what
matching needs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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
        items = concept.get("coding")
        if isinstance(items, Mapping):  # one Coding where R4 has a list: read it as a list of one
            items = [items]
        if not isinstance(items, list):
            return []
        out = []
        for raw in items:
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
