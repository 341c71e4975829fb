"""FHIR ValueSet expansion files: the codes a published value set expands to, read as data.

A payer's terminology team refreshes a value set by replacing its file (for example a newer VSAC expansion):
no code changes. Only ``expansion.contains`` is read (nested ``contains`` too); inactive codes are left out.
Codes of systems the registry does not know (ICD-9-CM in older sets) are counted in ``other_systems``: a value
set that takes such a file must say which systems it uses, so that nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .systems import CodeSystems, TerminologyError


@dataclass(frozen=True)
class Expansion:
    """The codes of one expansion file, by the registry's short system name."""

    path: Path
    url: str | None
    version: str | None
    title: str | None
    codes: Mapping[str, tuple[str, ...]]
    other_systems: Mapping[str, int]


def _contains(items: Any, where: str) -> Iterator[Mapping[str, Any]]:
    if not isinstance(items, list):
        raise TerminologyError(f"{where}: expansion.contains must be a list")
    for item in items:
        if not isinstance(item, Mapping):
            raise TerminologyError(f"{where}: every expansion.contains entry must be an object")
        if "code" in item or "contains" not in item:
            yield item
        if "contains" in item:
            yield from _contains(item["contains"], where)


def load_expansion(path: Path, systems: CodeSystems) -> Expansion:
    """Read a FHIR ValueSet with an expansion. Malformed files are errors that name the file and the fault."""
    where = path.name
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise TerminologyError(f"{where}: cannot be read ({error.strerror})") from None
    except ValueError as error:
        raise TerminologyError(f"{where}: not valid JSON ({error})") from None
    if not isinstance(data, Mapping) or data.get("resourceType") != "ValueSet":
        raise TerminologyError(f"{where}: not a FHIR ValueSet")
    expansion = data.get("expansion")
    if not isinstance(expansion, Mapping) or "contains" not in expansion:
        raise TerminologyError(f"{where}: has no expansion.contains (only expanded value sets can be loaded)")
    codes: dict[str, list[str]] = {}
    other: dict[str, int] = {}
    for entry in _contains(expansion["contains"], where):
        system, code = entry.get("system"), entry.get("code")
        if not isinstance(system, str) or not isinstance(code, str) or not code.strip():
            raise TerminologyError(f"{where}: an expansion entry lacks a system or a code: {dict(entry)!r}"[:300])
        if entry.get("inactive") is True:
            continue
        name = systems.short_name(system)
        if name is None:
            other[system] = other.get(system, 0) + 1
            continue
        codes.setdefault(name, []).append(code.strip())
    if not codes:
        raise TerminologyError(f"{where}: the expansion holds no active codes")

    def text(key: str) -> str | None:
        value = data.get(key)
        return value if isinstance(value, str) else None

    return Expansion(path, text("url"), text("version"), text("title"),
                     {k: tuple(dict.fromkeys(v)) for k, v in codes.items()}, other)
