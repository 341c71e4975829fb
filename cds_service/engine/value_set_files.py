"""Value sets as policy files write them: blocks of codes, each with its source, taken from published
expansion files or curated by hand.

```yaml
value_sets:
  chronic_pain_coded:
    title: chronic pain (coded as chronic)
    include:
      - expansion: valuesets/<file>.json    # every active code of a FHIR ValueSet expansion ...
        systems: [snomed, icd10cm]          # ... optionally only these systems
      - source: "CMS ICD-10-CM tabular, April 2026"
        icd10cm: [G89.2, G89.4]             # hand-curated codes, with where they were taken from
    exclude:
      - reason: "G89.3 is neoplasm-related pain"
        icd10cm: [G89.3]
    text: [chronic pain]                    # phrases, read when no code matches (negation-aware)
    text_match: when-uncoded                # or "always" (drug names in product displays)
    note: why the set is as narrow as it is
```
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..terminology import CodeBlock, CodeSystems, Expansion, TerminologyError, TextRules, ValueSet, load_expansion


class ValueSetFileError(ValueError):
    """A value set definition is not valid (the message names the file and the place)."""


class Expansions:
    """Expansion files, each read once however many value sets use it."""

    def __init__(self, base: Path, systems: CodeSystems) -> None:
        self.base = base
        self.systems = systems
        self._loaded: dict[Path, Expansion] = {}

    def get(self, relative: str) -> Expansion:
        path = (self.base / relative).resolve()
        if self.base.resolve() not in path.parents:
            raise TerminologyError(f"expansion {relative!r} must lie under {self.base}")
        if path not in self._loaded:
            self._loaded[path] = load_expansion(path, self.systems)
        return self._loaded[path]


def _codes(place: str, spec: Mapping[str, Any], systems: CodeSystems, skip: set[str]) -> dict[str, list[str]]:
    codes = {}
    for key, entries in spec.items():
        if key in skip:
            continue
        if key not in systems.names():
            raise ValueSetFileError(f"{place}: unknown key {key!r} (a code system short name, or one of "
                                    f"{sorted(skip)})")
        if not isinstance(entries, list) or not all(isinstance(e, str | int) for e in entries):
            raise ValueSetFileError(f"{place}: codes under {key!r} must be a list")
        codes[key] = [str(e) for e in entries]
    return codes


def _include(place: str, item: Any, systems: CodeSystems, expansions: Expansions) -> CodeBlock:
    if not isinstance(item, Mapping):
        raise ValueSetFileError(f"{place}: expected a mapping with 'expansion' or 'source'")
    if "expansion" in item:
        unknown = set(item) - {"expansion", "systems"}
        if unknown:
            raise ValueSetFileError(f"{place}: unknown key(s) {sorted(unknown)}")
        try:
            expansion = expansions.get(str(item["expansion"]))
        except TerminologyError as error:
            raise ValueSetFileError(f"{place}: {error}") from None
        wanted = item.get("systems")
        if wanted is not None and (not isinstance(wanted, list) or not set(wanted) <= systems.names()):
            raise ValueSetFileError(f"{place}: 'systems' must list code system short names")
        if wanted is None and expansion.other_systems:
            others = ", ".join(f"{uri} ({n})" for uri, n in sorted(expansion.other_systems.items()))
            raise ValueSetFileError(f"{place}: expansion {item['expansion']} also holds codes of systems not in "
                                    f"code-systems.yaml ({others}): say which systems to take with 'systems:'")
        codes = {s: list(c) for s, c in expansion.codes.items() if wanted is None or s in wanted}
        if not codes:
            raise ValueSetFileError(f"{place}: expansion {item['expansion']} has no codes of {wanted}")
        label = f"expansion {item['expansion']}" + (f" ({expansion.url}" + (f" version {expansion.version}" if
                                                                            expansion.version else "") + ")"
                                                    if expansion.url else "")
        return CodeBlock(label, codes)
    source = item.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ValueSetFileError(f"{place}: every block of codes needs a 'source' (where the codes were taken from)")
    codes = _codes(place, item, systems, {"source"})
    if not codes:
        raise ValueSetFileError(f"{place}: a block with no codes")
    return CodeBlock(source.strip(), codes)


def _exclude(place: str, item: Any, systems: CodeSystems) -> CodeBlock:
    if not isinstance(item, Mapping) or not isinstance(item.get("reason"), str):
        raise ValueSetFileError(f"{place}: an exclude block needs a 'reason'")
    return CodeBlock(str(item["reason"]), _codes(place, item, systems, {"reason"}))


def _blocks(place: str, value: Any, key: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueSetFileError(f"{place}: '{key}' must be a list")
    return value


def load_value_sets(where: str, data: Any, systems: CodeSystems, expansions: Expansions,
                    text_rules: TextRules) -> dict[str, ValueSet]:
    """The value sets of one file's ``value_sets`` mapping."""
    if not isinstance(data, Mapping):
        raise ValueSetFileError(f"{where}: 'value_sets' must be a mapping")
    out: dict[str, ValueSet] = {}
    for name, spec in data.items():
        place = f"{where}: value set {name!r}"
        if not isinstance(spec, Mapping):
            raise ValueSetFileError(f"{place}: expected a mapping")
        unknown = set(spec) - {"title", "include", "exclude", "text", "text_match", "note"}
        if unknown:
            raise ValueSetFileError(f"{place}: unknown key(s) {sorted(unknown)}")
        title = spec.get("title")
        if not isinstance(title, str) or not title.strip():
            raise ValueSetFileError(f"{place}: needs a 'title'")
        text = spec.get("text", [])
        if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
            raise ValueSetFileError(f"{place}: 'text' must be a list of phrases")
        includes = [_include(f"{place} include[{i}]", item, systems, expansions)
                    for i, item in enumerate(_blocks(place, spec.get("include"), "include"))]
        excludes = [_exclude(f"{place} exclude[{i}]", item, systems)
                    for i, item in enumerate(_blocks(place, spec.get("exclude"), "exclude"))]
        note = spec.get("note")
        try:
            out[str(name)] = ValueSet(str(name), title.strip(), systems, includes, excludes, text, text_rules,
                                      str(spec.get("text_match", "when-uncoded")),
                                      note.strip() if isinstance(note, str) else None)
        except TerminologyError as error:
            raise ValueSetFileError(f"{place}: {error}") from None
    return out
